"""ZeRO stage 0 with the overlapped gradient all-reduce equals DeepSpeed's own reduction, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_ranks

GAS, MICRO, EMB = 2, 4, 16


def _engine(
    world: int, stage: int, grad_accumulation: int = 1, micro: int = 2, norm: str = "", grad_clip: float = -1,
    embedding: int = EMB,
):
    """A DeepSpeed engine (fp32) of the demo net on this rank; `norm` / `grad_clip` override the config's."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.config.deepspeed import deepspeed_json
    from facescale.config.schema import Config
    from facescale.deepspeed_ops import skip_unused_ops
    from facescale.models.registry import build_backbone
    from facescale.train.trainer import build_backbone_optimizer

    skip_unused_ops()
    cfg = Config()
    cfg.model.name, cfg.model.embedding_size = "demo", embedding
    cfg.model.norm = norm or cfg.model.norm
    cfg.optim.grad_clip = grad_clip if grad_clip >= 0 else cfg.optim.grad_clip
    cfg.schedule.global_batch_size = micro * world * grad_accumulation
    cfg.schedule.grad_accumulation, cfg.deepspeed.zero_stage = grad_accumulation, stage
    torch.manual_seed(1)
    backbone = build_backbone(cfg.model)
    optimizer = build_backbone_optimizer(cfg, backbone.parameters())
    config = deepspeed_json(cfg, world, "fp32")
    engine, *_ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=config)
    return engine


def _train(rank: int, world: int, overlap: bool, bucket_mb: float) -> dict:
    from facescale.parallel.grad_overlap import overlap_grad_reduce

    engine = _engine(world, 0, grad_accumulation=GAS, micro=MICRO, norm="group", grad_clip=0.0)
    attached = overlap_grad_reduce(engine, bucket_mb) if overlap else None
    launched_in_backward: list[int] = []  # buckets already sent when DeepSpeed reaches its reduction point
    if attached is not None:
        finish = attached.finish

        def recording_finish(*args, **kwargs) -> None:
            if engine.is_gradient_accumulation_boundary():
                launched_in_backward.append(attached.next_launch)
            finish(*args, **kwargs)

        engine.allreduce_gradients = recording_finish
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    bucket_memory = []  # where each step's flat buckets lie: reused, not reallocated
    for _step in range(2):
        for _micro in range(GAS):
            images = torch.randn(MICRO, 3, 112, 112, generator=generator)
            target = torch.randn(MICRO, EMB, generator=generator)
            loss = ((engine(images) - target) ** 2).mean()
            engine.backward(loss)
            engine.step()
        if attached is not None:
            bucket_memory.append([bucket.flat.data_ptr() for bucket in attached.buckets])
    return {
        "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "buckets": 0 if attached is None else len(attached.buckets),
        "launched_in_backward": launched_in_backward,
        "bucket_memory": bucket_memory,
        "reduce": getattr(engine.allreduce_gradients, "__name__", ""),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_overlapped_reduce_equals_deepspeeds(world: int) -> None:
    reference = run_ranks(_train, world, False, 0.0)
    overlapped = run_ranks(_train, world, True, 0.05)  # tiny buckets: many of them, launched in backward
    for rank in range(world):
        for name, value in reference[rank]["params"].items():
            if world == 2:  # a + b is exact in any order: bit for bit
                assert torch.equal(overlapped[rank]["params"][name], value), name
            else:  # three ranks: the reduction may associate the sum differently
                torch.testing.assert_close(overlapped[rank]["params"][name], value, rtol=1e-6, atol=1e-7)
    assert overlapped[0]["buckets"] > 3
    # DeepSpeed's reduction point is reached once per step (the last micro-step), with buckets already sent
    launched = overlapped[0]["launched_in_backward"]
    assert len(launched) == 2 and all(count > 0 for count in launched), launched
    first_step, second_step = overlapped[0]["bucket_memory"]
    assert first_step == second_step  # the flat buckets persist across steps, as DDP's
    # ranks agree, and the step moved the weights (a test that could not fail would not)
    first = reference[0]["params"]
    assert all(torch.equal(first[n], reference[1]["params"][n]) for n in first)
    torch.manual_seed(1)
    from facescale.config.schema import Config
    from facescale.models.registry import build_backbone

    cfg = Config()
    cfg.model.name, cfg.model.embedding_size, cfg.model.norm = "demo", EMB, "group"
    initial = dict(build_backbone(cfg.model).named_parameters())
    assert any(not torch.equal(initial[n].detach(), first[n]) for n in first)


def test_one_rank_skips_deepspeeds_self_reduction_with_the_same_result() -> None:
    """A single rank has nothing to reduce: DeepSpeed's flatten / all-reduce / copy-back is dropped and the
    weights after two accumulated steps are bitwise those of DeepSpeed's own path."""
    (reference,) = run_ranks(_train, 1, False, 0.0)
    (skipped,) = run_ranks(_train, 1, True, 0.0)
    assert skipped["reduce"] == "_nothing_to_reduce" and reference["reduce"] != "_nothing_to_reduce"
    for name, value in reference["params"].items():
        assert torch.equal(skipped["params"][name], value), name


def _attached(rank: int, world: int, stage: int) -> bool:
    from facescale.parallel.grad_overlap import overlap_grad_reduce

    return overlap_grad_reduce(_engine(world, stage)) is not None


def test_only_stage_zero_with_several_ranks_gets_it() -> None:
    assert run_ranks(_attached, 2, 0) == [True, True]
    assert run_ranks(_attached, 2, 1) == [False, False]
    assert run_ranks(_attached, 1, 0) == [False]


def _double_accumulation(rank: int, world: int) -> str:
    from facescale.parallel.grad_overlap import overlap_grad_reduce

    engine = _engine(world, 0)
    attached = overlap_grad_reduce(engine)
    param = next(p for p in engine.module.parameters() if p.requires_grad)
    attached._grad_ready(param)  # what a post-accumulate hook does; a second call = a second accumulation
    try:
        attached._grad_ready(param)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_gradient_accumulated_twice_in_one_backward_is_refused_by_name() -> None:
    messages = run_ranks(_double_accumulation, 2)
    assert all("accumulated twice in one backward" in m and "zero_stage: 1" in m for m in messages), messages


def _launch_order(rank: int, world: int) -> dict:
    from facescale.parallel.grad_overlap import overlap_grad_reduce

    engine = _engine(world, 0, micro=MICRO, embedding=512)  # fc: 512 x 4704 floats, 9.2 of the net's 9.9 MB
    attached = overlap_grad_reduce(engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    params = [p for p in engine.module.parameters() if p.requires_grad]  # features.weight is frozen
    waiting_at_launch = []  # parameters still without a gradient when each bucket is sent
    launch = attached._launch

    def recording_launch(bucket) -> None:
        waiting_at_launch.append(sum(p.grad is None for p in params))
        launch(bucket)

    attached._launch = recording_launch
    images = torch.randn(MICRO, 3, 112, 112, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(images).square().mean())
    engine.step()
    return {"buckets": [[names[id(p)] for p in b.params] for b in attached.buckets],
            "waiting_at_launch": waiting_at_launch, "params": len(params)}


def test_the_first_bucket_is_small_and_sent_while_backward_runs() -> None:
    """As DDP: the first bucket closes at 1 MiB, so the demo net's last layers (its fc holds 93% of its
    weights) are sent as soon as backward has them, not in one bucket with the whole net after backward."""
    result = run_ranks(_launch_order, 2)[0]
    first, *rest = result["buckets"]
    assert first == ["features.bias", "fc.bias", "fc.weight"]
    assert len(rest) == 1 and len(rest[0]) == result["params"] - 3  # the other 0.7 MB: under 25 MB
    assert result["waiting_at_launch"] == [result["params"] - 3, 0]
