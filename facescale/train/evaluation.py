"""Verification during training: the `.bin` sets of `eval.bins` scored at a step, extraction split over ranks.

A set that cannot be read or decoded now (it was checked at start: moved, rewritten, a lost mount) is skipped
with a warning and tried again at the next evaluation, rather than ending the run and losing the steps since
the last checkpoint; any other error still ends it.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from facescale.config.schema import Config
from facescale.errors import InputError
from facescale.metrics.console import TrainConsole
from facescale.metrics.writer import MetricsWriter
from launcher.env import DistEnv


def eval_model(cfg: Config, engine, device: torch.device, env: DistEnv) -> torch.nn.Module:
    """A plain copy of the backbone with rank 0's BatchNorm statistics on every rank.

    Each rank's running statistics come from its own batches; extraction is split across ranks, so all
    must embed with the same statistics, the ones the checkpoint keeps (rank 0's). Under ZeRO-3 the
    parameters are gathered for the copy, which also lets ranks run unequal numbers of batches.
    """
    import deepspeed

    from facescale.models.registry import build_backbone

    copy = build_backbone(cfg.model).to(device)
    params = list(engine.module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        copy.load_state_dict(engine.module.state_dict())
    if dist.is_initialized() and env.world_size > 1:
        for buffer in copy.buffers():
            dist.broadcast(buffer, src=0)
    return copy


def evaluate_sets(cfg: Config, engine, device: torch.device, env: DistEnv, step: int, metrics: MetricsWriter,
                  console: TrainConsole, skipped: dict[str, int]) -> dict:
    """{set name: report} for every set of `eval.bins` scored at `step`, logged to `metrics` and the console;
    a set that could not be evaluated is recorded in `skipped` (path -> step) instead."""
    from facescale.eval.binfile import EvalSetError
    from facescale.eval.extract import ExtractionFailed, evaluate_bin

    results: dict = {}
    model = eval_model(cfg, engine, device, env)
    model.eval()
    for path in cfg.eval.bins:
        try:
            res = evaluate_bin(model, path, batch_size=cfg.eval.batch_size, device=device, rank=env.rank,
                               world_size=env.world_size, image_size=cfg.data.image_size, progress=False,
                               roc_image=env.rank == 0)
        except (EvalSetError, ExtractionFailed) as error:
            skipped[path] = step
            _warn_skipped(path, error, step, env.rank, metrics)
            continue
        name = res["name"]
        roc = res.pop("roc_image", None)
        if roc is not None:
            metrics.image(step, f"eval/{name}/roc", roc)
        results[name] = res
        metrics.scalars(step, {f"eval/{name}/{k}": v for k, v in res.items()
                               if isinstance(v, float | int) and not isinstance(v, bool)})
        metrics.scalars(step, console.eval_result(step, name, res))
    return results


def _warn_skipped(path: str, error: Exception, step: int, rank: int, metrics: MetricsWriter) -> None:
    """Rank 0's console and train.log say that `path` was skipped, with the cause when it was rank 0's (an
    input error of another rank is printed by that rank, on stderr)."""
    cause = error.line() if isinstance(error, InputError) else str(error)
    if isinstance(error, InputError) and rank != 0:
        print(f"[eval] rank {rank}: step {step}: {cause}", file=sys.stderr, flush=True)
    metrics.console(f"[eval] step {step}: skipped {path} ({cause}); training goes on, and the set is tried "
                    "again at the next evaluation")
