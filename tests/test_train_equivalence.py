"""One full training step (DeepSpeed backbone + model-parallel head): W=2 equals W=1 on the same batch."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_ranks

STAGES = (0, 1, 2, 3)
GLOBAL_BATCH, NUM_CLASSES, EMB = 8, 11, 16


def _config(world: int, stage: int, sample_rate: float, grad_clip: float = 1e6):
    from facescale.config.schema import Config

    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.model.norm = "demo", EMB, "group"
    cfg.schedule.global_batch_size = GLOBAL_BATCH
    cfg.deepspeed.zero_stage = stage
    cfg.optim.grad_clip = grad_clip  # 1e6 never binds, but makes every stage compute the global norm
    cfg.head.sample_rate = sample_rate
    return cfg


def _one_step(rank: int, world: int, stage: int, grad_clip: float = 1e6) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.checkpoint.manager import consolidated_backbone_state
    from facescale.config.deepspeed import deepspeed_json
    from facescale.heads import build_head
    from facescale.models.registry import build_backbone
    from facescale.modes import StepContext
    from facescale.partial_fc.mode import PartialFCRun
    from facescale.train.step import train_step
    from facescale.train.trainer import build_backbone_optimizer, keep_clip_norm

    cfg = _config(world, stage, 1.0, grad_clip)
    torch.manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 112, 112)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,))
    per = GLOBAL_BATCH // world
    batch = (images[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per])
    torch.manual_seed(1)
    backbone = build_backbone(cfg.model)
    engine, *_ = deepspeed.initialize(
        model=backbone,
        optimizer=build_backbone_optimizer(cfg, backbone.parameters()),
        config=deepspeed_json(cfg, world, "fp32"),
    )
    keep_clip_norm(engine)
    head = build_head(cfg.head, NUM_CLASSES, EMB, seed=3)
    ctx = StepContext(engine, 0, 0.1, 0.1, world, 1, lambda: 0.0)
    out = train_step(PartialFCRun(head, None), iter([batch]), ctx)
    state = head.state_dict()
    return {
        "loss": out.loss,
        "grad_norm": out.grad_norm,
        "backbone": consolidated_backbone_state(engine),
        "centers": state["centers"].float().clone(),
        "start": int(state["meta"]["start"]),
    }


def _all_stages(rank: int, world: int) -> list[dict]:
    return [_one_step(rank, world, s) for s in STAGES]


@pytest.mark.slow
def test_w2_step_equals_w1_step_for_every_zero_stage():
    single = run_ranks(_all_stages, 1)[0]
    double = run_ranks(_all_stages, 2)
    for i, stage in enumerate(STAGES):
        ref, parts = single[i], [r[i] for r in double]
        assert parts[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"stage {stage} loss"
        # stage 0's norm (DeepSpeed's clip, kept by keep_clip_norm) against the ZeRO optimizers' own
        assert ref["grad_norm"] is not None and parts[0]["grad_norm"] is not None, f"stage {stage} norm"
        assert parts[0]["grad_norm"] == pytest.approx(single[1]["grad_norm"], rel=1e-4), f"stage {stage}"
        assert ref["grad_norm"] == pytest.approx(single[1]["grad_norm"], rel=1e-4), f"stage {stage}"
        for name, value in ref["backbone"].items():
            torch.testing.assert_close(
                parts[0]["backbone"][name],
                value,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name, s=stage: f"stage {s} {n}: {m}",
            )
        merged = torch.cat([p["centers"] for p in sorted(parts, key=lambda p: p["start"])])
        torch.testing.assert_close(merged, ref["centers"], rtol=1e-4, atol=1e-6)
        # the step really changed something (guards against a test that cannot fail)
        assert not torch.equal(ref["centers"], _initial_centers(ref["centers"].shape))


def _stages_zero_and_one_clipped(rank: int, world: int) -> list[dict]:
    return [_one_step(rank, world, stage, grad_clip=1e-3) for stage in (0, 1)]


@pytest.mark.slow
def test_stage_zero_clips_like_zero_one_when_the_clip_binds():
    """Stage 0 clips with torch's clip_grad_norm_ (trainer.keep_clip_norm), ZeRO-1 with DeepSpeed's own:
    with a clip that binds, the same step gives the same backbone and the same norm."""
    stage0, stage1 = run_ranks(_stages_zero_and_one_clipped, 2)[0]
    assert stage0["grad_norm"] > 1e-3  # the clip binds
    assert stage0["grad_norm"] == pytest.approx(stage1["grad_norm"], rel=1e-5)
    for name, value in stage1["backbone"].items():
        torch.testing.assert_close(stage0["backbone"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def _initial_centers(shape) -> torch.Tensor:
    from facescale.heads import build_head

    cfg = _config(1, 0, 1.0)
    return build_head(cfg.head, NUM_CLASSES, EMB, seed=3).state_dict()["centers"].float()
