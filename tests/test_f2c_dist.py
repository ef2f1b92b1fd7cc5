"""Two gloo ranks: the replicated pool stays identical on every rank and equals one process fed the whole
batch; the sharded pool (hash-owned slots, distributed softmax and top-K) gives the same losses and
gradients as the replicated one at small Q, through fill, in-pass duplicates, eviction and outliers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from facescale.config.schema import MarginConfig
from facescale.f2c.ema import GalleryNet
from facescale.f2c.head import DcpHead, label_owner
from facescale.heads.margins import build_margin
from tests.distributed import run_ranks

DIM, Q, WORLD, ROWS = 8, 16, 2, 9  # ROWS per rank: 8 distinct labels + 1 duplicate
SPEC = build_margin(MarginConfig(type="arcface", s=16.0, m2=0.4))


def _head(mode: str) -> DcpHead:
    return DcpHead(
        GalleryNet(torch.nn.Linear(3, DIM), 0.99), DIM, SPEC, queue_size=Q, seed=11, pool_mode=mode
    )


def _scenario(steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Gathered (all-rank) batches whose evictions are the same for one global LRU and per-owner LRUs:
    each step leaves out one pooled label per owner and brings one new label per owner on each side."""
    owners = label_owner(torch.arange(200), WORLD)
    fresh = [iter(torch.nonzero(owners == r).flatten().tolist()) for r in range(WORLD)]
    pooled = [next(fresh[r]) for _ in range(Q // WORLD) for r in range(WORLD)]
    out, g = [], torch.Generator().manual_seed(0)
    for step in range(steps):
        if step == 0:
            base_x, base_y = list(pooled), list(pooled)
        else:
            leave = [next(lab for lab in pooled if int(owners[lab]) == r) for r in range(WORLD)]
            kept = [lab for lab in pooled if lab not in leave]
            new_x, new_y = [next(fresh[r]) for r in range(WORLD)], [next(fresh[r]) for r in range(WORLD)]
            base_x, base_y = kept + new_x, kept + new_y
            pooled = kept + new_x  # the commit pass inserts x
        batch = {}
        for side, base in (("x", base_x), ("y", base_y)):
            labels = torch.tensor(base)[torch.randperm(len(base), generator=g)]
            labels = torch.cat([labels, labels[:WORLD]])  # duplicates: refreshed slots, row 1 in use
            labels = labels.view(ROWS, WORLD).t().reshape(-1)  # spread the duplicates over the ranks
            batch[f"labels_{side}"] = labels
            batch[f"probe_{side}"] = torch.randn(len(labels), DIM, generator=g)
            batch[f"gallery_{side}"] = F.normalize(torch.randn(len(labels), DIM, generator=g), dim=1)
        out.append(batch)
    return out


def _run(head: DcpHead, batches: list[dict], rank: int, world: int) -> list[dict]:
    results = []
    rows = slice(rank * ROWS, (rank + 1) * ROWS) if world > 1 else slice(None)
    for batch in batches:
        px = batch["probe_x"][rows].clone().requires_grad_()
        py = batch["probe_y"][rows].clone().requires_grad_()
        loss, stats = head(
            px,
            py,
            batch["labels_x"][rows],
            batch["labels_y"][rows],
            batch["gallery_x"][rows],
            batch["gallery_y"][rows],
        )
        loss.backward()
        results.append(
            {
                "loss": loss.detach(),
                "gx": px.grad,
                "gy": py.grad,
                "stats": stats,
                "pool": head.pool.pool_state(),
            }
        )
    return results


def _both_modes(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # anything that silently used the global RNG would diverge between ranks
    batches = _scenario()
    return {mode: _run(_head(mode), batches, rank, world) for mode in ("replicated", "sharded")}


def test_replicated_identical_on_ranks_sharded_matches_and_both_equal_one_process():
    ranks = run_ranks(_both_modes, WORLD)
    single = _run(_head("replicated"), _scenario(), 0, 1)
    for step, ref in enumerate(single):
        for mode in ("replicated", "sharded"):
            for rank in range(WORLD):
                got = ranks[rank][mode][step]
                torch.testing.assert_close(got["loss"], ref["loss"], msg=f"{mode} rank {rank} step {step}")
                rows = slice(rank * ROWS, (rank + 1) * ROWS)
                torch.testing.assert_close(got["gx"], ref["gx"][rows], msg=f"{mode} grad x step {step}")
                torch.testing.assert_close(got["gy"], ref["gy"][rows], msg=f"{mode} grad y step {step}")
                assert got["stats"]["pooled_probe_fraction"] == ref["stats"]["pooled_probe_fraction"]
        for key in ("features", "slot_label", "last_seen", "row_ptr"):
            assert torch.equal(
                ranks[0]["replicated"][step]["pool"][key], ranks[1]["replicated"][step]["pool"][key]
            )
            assert torch.equal(ranks[0]["replicated"][step]["pool"][key], ref["pool"][key])
    # the scenario really exercised outliers and refreshed rows
    assert 0.0 < single[1]["stats"]["pooled_probe_fraction"] < 1.0
    assert single[1]["stats"]["outlier_loss"] > 0.0
    sharded_labels = torch.cat([ranks[r]["sharded"][-1]["pool"]["slot_label"] for r in range(WORLD)])
    assert sorted(sharded_labels.tolist()) == sorted(single[-1]["pool"]["slot_label"].tolist())


def _skewed_owner_run(rank: int, world: int) -> dict:
    """A label hash that sends every label to rank 0: its 4-slot shard gets 10 distinct labels a pass."""
    import warnings

    import facescale.f2c.head as head_module

    head_module.label_owner = lambda labels, world_size: torch.zeros_like(labels)
    head = DcpHead(GalleryNet(torch.nn.Linear(3, DIM), 0.99), DIM, SPEC, queue_size=8, seed=11,
                   pool_mode="sharded")
    g = torch.Generator().manual_seed(rank)
    labels = torch.arange(5) + 5 * rank
    probes = [torch.randn(5, DIM, generator=g, requires_grad=True) for _ in range(2)]
    gallery = [F.normalize(torch.randn(5, DIM, generator=g), dim=1) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, stats = head(probes[0], probes[1], labels, labels, *gallery)
    loss.backward()
    return {"loss": float(loss), "stats": stats, "pooled": sorted(head.pool.slot_label.tolist()),
            "warned": [str(w.message) for w in caught],
            "grad_finite": bool(torch.isfinite(probes[0].grad).all())}


def test_sharded_pool_spills_a_skewed_pass_with_a_count_instead_of_stopping():
    results = run_ranks(_skewed_owner_run, WORLD)
    for r in results:
        assert r["stats"]["pool_spilled_labels"] == 2 * (10 - 4)  # two passes, 6 labels left out each
        assert torch.isfinite(torch.tensor(r["loss"])) and r["grad_finite"]
        assert r["loss"] == results[0]["loss"]
    assert results[0]["pooled"] == [6, 7, 8, 9]  # the most recently gathered labels (rank 1's last four)
    assert results[1]["pooled"] == [-1, -1, -1, -1]
    assert any("pool_spilled_labels" in m for m in results[0]["warned"]) and not results[1]["warned"]
