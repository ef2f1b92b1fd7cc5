"""`facescale plan` for F2C configs against a real 2-rank F2C head: pool, G-Net copy and identity index
bytes measured on the real objects, and the per-step traffic counted on the collectives one iteration runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facescale.config.schema import Config, MarginConfig, ModelConfig
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead
from facescale.heads.margins import build_margin
from facescale.plan import backbone_stats, plan_rank
from tests.distributed import run_ranks

DIM, Q, MICRO, IDS, WORLD = 8, 12, 4, 2, 2
PROBES = IDS + MICRO // 2  # per rank and pass


def _cfg(pool: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name="demo", embedding_size=DIM)
    cfg.head.type = "f2c"
    cfg.head.f2c.queue_size, cfg.head.f2c.identities_per_rank, cfg.head.f2c.pool = Q, IDS, pool
    cfg.schedule.global_batch_size, cfg.deepspeed.precision = MICRO * WORLD, "fp32"
    return cfg


def _ring_bytes(kind: str, nbytes: int, world: int) -> float:
    """Bytes one rank sends in a ring collective (independent of facescale.plan's helpers)."""
    if kind == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    return (world - 1) / world * nbytes  # all-gather: nbytes = result; reduce-scatter: nbytes = input


def _one_iteration(rank: int, world: int, pool: str) -> dict:
    """Run one F2C iteration's head work (two passes, backward) on this rank, counting collective bytes."""
    import facescale.parallel.collectives as coll

    sent = {"bytes": 0.0}
    gather, scatter, reduce = coll._all_gather_flat, coll._reduce_scatter_flat, torch.distributed.all_reduce

    def counted_gather(out, tensor, group=None):
        sent["bytes"] += _ring_bytes("all_gather", out.numel() * out.element_size(), world)
        return gather(out, tensor, group=group)

    def counted_scatter(out, tensor, group=None):
        sent["bytes"] += _ring_bytes("reduce_scatter", tensor.numel() * tensor.element_size(), world)
        return scatter(out, tensor, group=group)

    def counted_reduce(tensor, *args, **kwargs):
        sent["bytes"] += _ring_bytes("all_reduce", tensor.numel() * tensor.element_size(), world)
        return reduce(tensor, *args, **kwargs)

    torch.manual_seed(0)
    net = torch.nn.Linear(3, DIM)
    head = DcpHead(GalleryNet(net, 0.99), DIM, build_margin(MarginConfig()), queue_size=Q, seed=1,
                   pool_mode=pool)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randperm(50, generator=g)[:IDS] + 100 * rank
    labels_x = torch.cat([ids, torch.randint(0, 200, (MICRO // 2,), generator=g)])
    labels_y = torch.cat([ids, torch.randint(0, 200, (MICRO // 2,), generator=g)])
    coll._all_gather_flat, coll._reduce_scatter_flat = counted_gather, counted_scatter
    torch.distributed.all_reduce = counted_reduce
    try:
        px = torch.randn(PROBES, DIM, generator=g, requires_grad=True)
        py = torch.randn(PROBES, DIM, generator=g, requires_grad=True)
        gallery = [F.normalize(torch.randn(PROBES, DIM, generator=g), dim=1) for _ in range(2)]
        loss, _ = head(px, py, labels_x, labels_y, *gallery)
        loss.backward()
    finally:
        coll._all_gather_flat, coll._reduce_scatter_flat = gather, scatter
        torch.distributed.all_reduce = reduce
    head.pool.label_map()  # the lookup map a step builds
    pool_bytes = sum(t.numel() * t.element_size() for t in (*head.pool.buffers(), *head.pool.label_map()))
    return {"sent": sent["bytes"], "slots": head.pool.num_slots, "pool_bytes": pool_bytes}


@pytest.mark.parametrize("pool", ["replicated", "sharded"])
def test_f2c_plan_matches_a_real_two_rank_iteration(pool):
    measured = run_ranks(_one_iteration, WORLD, pool)
    for rank, real in enumerate(measured):
        plan = plan_rank(_cfg(pool), 1000, WORLD, rank=rank, num_samples=5000)
        assert plan.head.slots == real["slots"]
        pool_items = {k: v for k, v in plan.head.memory.items() if k.startswith("pool")}
        assert sum(pool_items.values()) == real["pool_bytes"]
        if pool == "replicated":  # data-independent: exact
            assert plan.total_traffic - _backbone_traffic(plan) == pytest.approx(real["sent"])
        else:  # the softmax / top-K share depends on which probes are pooled: the plan is its bound
            bound = plan.head.traffic
            fixed = sum(v for k, v in bound.items() if "bound" not in k)
            assert fixed < real["sent"] <= sum(bound.values())


def _backbone_traffic(plan) -> float:
    return sum(v for k, v in plan.traffic.items() if k.startswith("backbone"))


def test_f2c_plan_gnet_and_identity_index_match_the_real_objects(tmp_path):
    from facescale.data.identity_index import IdentityIndex
    from facescale.data.synth import synthesize
    from facescale.models.registry import build_backbone

    manifest = synthesize(tmp_path / "shards", 30, 3, 0, seed=1, image_size=32, shard_size=40)
    cfg = _cfg("replicated")
    cfg.data.shards = str(tmp_path / "shards")
    plan = plan_rank(cfg, manifest.num_classes, WORLD, stats=backbone_stats(cfg.model, "fp32"))
    gnet = GalleryNet(build_backbone(cfg.model), 0.99).net
    real_gnet = sum(t.numel() * t.element_size() for t in (*gnet.parameters(), *gnet.buffers()))
    assert plan.head.memory["G-Net (fp32 EMA copy)"] == real_gnet
    index = IdentityIndex.build(tmp_path / "shards")
    real_index = sum(a.nbytes for a in (index.starts, index.shard, index.offset, index.size))
    assert plan.host_memory["identity index"] == real_index
    assert plan.activations == plan.backbone.activation_bytes_per_sample * 2 * PROBES


def test_plan_cli_on_the_f2c_config_reports_the_pool(capsys):
    from facescale.cli import main

    assert main(["plan", "--config", "configs/webface42m_f2c.yaml", "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    for item in ("pool features", "G-Net (fp32 EMA copy)", "identity index", "gallery feature all-gather",
                 "42,474,557 images"):
        assert item in out
    assert "center shard" not in out and "class centers" not in out
