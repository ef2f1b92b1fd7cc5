"""Resume on another world size: 2 -> 1 -> 3 -> 2 ranks, with real DeepSpeed engines and Partial FC heads.

Every hop restores the class centers, their momentum, the backbone weights and the backbone momentum
exactly (compared with what the previous world saved), and the losses of the continued run equal those of
one uninterrupted single-rank run (GroupNorm backbone, no sampling: the math does not depend on W).
The 1 -> 3 hop goes through the offline `facescale reshard` command; `facescale export-head` is checked too.
The same exactness holds for a ZeRO-3 backbone (partitioned parameters), for AdamW without ZeRO, and for a
resume on the same world size under another ZeRO stage (DeepSpeed's own files hold the saving stage's
partitions, so that resume reads the consolidated copy).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

GLOBAL_BATCH, NUM_CLASSES, EMB = 12, 13, 16


def _config(zero_stage: int = 1, optimizer: str = "sgd"):
    from facescale.config.schema import Config

    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.model.norm = "demo", EMB, "group"
    cfg.schedule.global_batch_size = GLOBAL_BATCH
    cfg.deepspeed.zero_stage = zero_stage
    cfg.optim.name = optimizer
    cfg.optim.grad_clip = 0.0
    cfg.head.sample_rate = 1.0
    return cfg


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 112, 112, generator=g)
    return images, torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)


def _snapshot(engine, head) -> dict:
    """This rank's head rows plus (rank 0) the consolidated backbone weights and optimizer state."""
    from facescale.checkpoint.backbone_state import consolidated_optimizer_state, consolidated_weights

    state = head.state_dict()
    return {
        "start": state["meta"]["start"],
        "centers": state["centers"].clone(),
        "momentum": state["optimizer"]["momentum_buffer"].clone(),
        "weights": consolidated_weights(engine),
        "backbone_optim": consolidated_optimizer_state(engine),
    }


def _train(rank: int, world: int, load: str | None, save: str, first: int, save_at: int, zero_stage: int = 1,
           optimizer: str = "sgd") -> dict:
    """Build, optionally resume from `load`, run steps [first, save_at), save, then run step `save_at` once
    more (the loss the next world must reproduce); report losses and states."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.checkpoint import CheckpointManager
    from facescale.config.deepspeed import deepspeed_json
    from facescale.config.load import config_yaml
    from facescale.heads import build_head
    from facescale.models.registry import build_backbone
    from facescale.modes import StepContext
    from facescale.partial_fc.mode import PartialFCRun
    from facescale.train.step import train_step
    from facescale.train.trainer import build_backbone_optimizer

    cfg = _config(zero_stage, optimizer)
    fresh_seed = 7 if load is None else 1000 + rank  # a resumed run must not depend on its fresh init
    torch.manual_seed(fresh_seed)
    backbone = build_backbone(cfg.model)
    engine, *_ = deepspeed.initialize(
        model=backbone,
        optimizer=build_backbone_optimizer(cfg, backbone.parameters()),
        config=deepspeed_json(cfg, world, "fp32"),
    )
    head = build_head(cfg.head, NUM_CLASSES, EMB, seed=fresh_seed)
    manager = CheckpointManager(save, rank, world)
    loaded = None
    if load:
        manager.load(load, engine, head)
        loaded = _snapshot(engine, head)
    per = GLOBAL_BATCH // world
    losses, saved = [], None
    for step in range(first, save_at + 1):
        if step == save_at:
            manager.save(save_at, engine, head, {"seed": 0}, config_yaml(cfg))
            saved = _snapshot(engine, head)
        images, labels = _global_batch(step)
        batch = (images[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per])
        ctx = StepContext(engine, step, 0.1, 0.1, world, 1, lambda: 0.0)
        out = train_step(PartialFCRun(head, None), iter([batch]), ctx)
        losses.append(out.loss)
    return {"loaded": loaded, "saved": saved, "losses": losses}


def _merged(parts: list[dict], key: str) -> torch.Tensor:
    return torch.cat([p[key] for p in sorted(parts, key=lambda p: p["start"])])


def _assert_restored(previous: list[dict], resumed: list[dict], optimizer: str = "sgd") -> None:
    """What `resumed` loaded equals, bit for bit, what `previous` saved."""
    before, after = [r["saved"] for r in previous], [r["loaded"] for r in resumed]
    for key in ("centers", "momentum"):
        assert torch.equal(_merged(after, key), _merged(before, key)), key
    for name, value in before[0]["weights"].items():
        assert torch.equal(after[0]["weights"][name], value), name
    saved_optim, loaded_optim = before[0]["backbone_optim"]["params"], after[0]["backbone_optim"]["params"]
    keys = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq"}}[optimizer]
    assert saved_optim and all(set(v) == keys for v in saved_optim.values())
    for name, state in saved_optim.items():
        for key in keys:
            assert torch.equal(loaded_optim[name][key], state[key]), (name, key)
    assert after[0]["backbone_optim"]["scalars"] == before[0]["backbone_optim"]["scalars"]


@pytest.mark.slow
def test_resume_on_other_world_sizes_is_exact_and_continues_the_loss(tmp_path: Path):
    from facescale.cli import main

    a = run_ranks(_train, 2, None, str(tmp_path / "a"), 0, 2)
    b = run_ranks(_train, 1, str(tmp_path / "a"), str(tmp_path / "b"), 2, 3)  # 2 -> 1
    _assert_restored(a, b)
    resharded = tmp_path / "b3"
    argv = ["reshard", "--checkpoint", str(tmp_path / "b"), "--world-size", "3", "--out", str(resharded)]
    assert main(argv) == 0
    c = run_ranks(_train, 3, str(resharded), str(tmp_path / "c"), 3, 4)  # 1 -> 3, offline reshard
    _assert_restored(b, c)
    d = run_ranks(_train, 2, str(tmp_path / "c"), str(tmp_path / "d"), 4, 4)  # 3 -> 2, online
    _assert_restored(c, d)

    # the first loss after each resume is the loss the saving world computed for that step
    for before, after in ((a, b), (b, c), (c, d)):
        assert after[0]["losses"][0] == pytest.approx(before[0]["losses"][-1], rel=1e-5)
    assert a[0]["losses"][0] != pytest.approx(d[0]["losses"][-1], rel=1e-3)  # training moved

    out = tmp_path / "centers.pt"
    assert main(["export-head", "--checkpoint", str(tmp_path / "d"), "--out", str(out)]) == 0
    full = torch.load(out, weights_only=True)
    assert full.shape == (NUM_CLASSES, EMB)
    assert torch.equal(full, _merged([r["saved"] for r in d], "centers"))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,optimizer", [(3, "sgd"), (3, "adamw"), (0, "adamw")])
def test_resume_on_other_world_sizes_for_zero3_and_adamw(tmp_path: Path, zero_stage: int, optimizer: str):
    a = run_ranks(_train, 2, None, str(tmp_path / "a"), 0, 2, zero_stage, optimizer)
    b = run_ranks(_train, 3, str(tmp_path / "a"), str(tmp_path / "b"), 2, 3, zero_stage, optimizer)  # 2 -> 3
    _assert_restored(a, b, optimizer)
    c = run_ranks(_train, 1, str(tmp_path / "b"), str(tmp_path / "c"), 3, 3, zero_stage, optimizer)  # 3 -> 1
    _assert_restored(b, c, optimizer)
    for before, after in ((a, b), (b, c)):
        assert after[0]["losses"][0] == pytest.approx(before[0]["losses"][-1], rel=1e-5)


@pytest.mark.slow
def test_resume_under_another_zero_stage_is_exact(tmp_path: Path):
    a = run_ranks(_train, 2, None, str(tmp_path / "a"), 0, 2, 1)  # ZeRO-1
    b = run_ranks(_train, 2, str(tmp_path / "a"), str(tmp_path / "b"), 2, 3, 2)  # same W, ZeRO-2
    _assert_restored(a, b)
    c = run_ranks(_train, 2, str(tmp_path / "b"), str(tmp_path / "c"), 3, 3, 0)  # same W, no ZeRO
    _assert_restored(b, c)
    for before, after in ((a, b), (b, c)):
        assert after[0]["losses"][0] == pytest.approx(before[0]["losses"][-1], rel=1e-5)
