"""The one step skeleton of every training mode: the backbone in DeepSpeed, the mode's head outside it.

Decoupled backward: the mode's head sees detached embeddings (`MicroOutput.pairs`), computes the exact global
loss and its gradient w.r.t. this rank's embeddings (the all-gather's backward is a reduce-scatter), updates
itself in `finish_step`, and the gradient is handed to the engine through the surrogate `sum(emb * grad)`.
DeepSpeed averages backbone gradients over the W data-parallel ranks and divides by the accumulation steps,
so the surrogate is scaled by W * GAS to make the backbone gradient that of the global-mean loss.

Loss guard: a non-finite loss or embedding gradient on any rank and micro-step (one MAX all-reduce per
step), or DeepSpeed's own overflow verdict, skips the whole step: the engine's step runs with the torch
optimizer's update disabled (DeepSpeed still clears its gradients), the head drops its gradients, and
module buffers (BatchNorm statistics) are put back. `inject_nan` poisons the loss of every micro-step, to
test that path honestly (the trainer sets it from FACESCALE_INJECT_NAN_STEPS).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from facescale.errors import InputError
from facescale.modes.base import ModeRun, StepContext


@dataclass
class StepResult:
    """What one optimizer step produced (loss averaged over its micro-steps)."""

    loss: float
    data_wait_s: float
    grad_norm: float | None
    head_s: float = 0.0  # wall time in the class-center layer: forward, backward, optimizer step
    head_stats: dict = field(default_factory=dict)
    skipped: bool = False  # the loss guard dropped this step: no backbone or head update


NAN_INJECTION_ENV = "FACESCALE_INJECT_NAN_STEPS"


class NonFiniteLossError(InputError):
    """More consecutive steps than `checkpoint.max_bad_steps` had a non-finite loss or gradient: settings or
    data need a change (a requeue would diverge again). Every rank raises it alike, at the same step."""

    every_rank = True


def nan_injection_steps() -> frozenset[int]:
    """0-based steps whose loss is poisoned with NaN, from FACESCALE_INJECT_NAN_STEPS="3,4" (tests only)."""
    raw = os.environ.get(NAN_INJECTION_ENV, "").strip()
    try:
        return frozenset(int(part) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"{NAN_INJECTION_ENV}={raw!r}: expected comma-separated step numbers") from exc


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (MAX all-reduce; the flag itself when alone)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _base_optimizer(engine) -> torch.optim.Optimizer:
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


@contextmanager
def update_disabled(engine):
    """Within, the engine's step does its bookkeeping (gradient reduction, clearing, counters) but the
    torch optimizer under it changes neither parameters nor state."""
    base = _base_optimizer(engine)
    base.step = lambda *args, **kwargs: None  # instance attribute shadows the class method
    try:
        yield
    finally:
        del base.step


class LossGuard:
    """The loss guard of one optimizer step (see the module docstring), used by `train_step`.

    `check` each micro-step's loss and embedding gradients, `engine_step` in place of `engine.step()`, and
    `finish` once after the last micro-step: it returns whether the step was skipped (and then has put the
    module buffers back)."""

    def __init__(self, engine, grad_accumulation: int) -> None:
        self.engine, self.grad_accumulation = engine, grad_accumulation
        self.buffers = [(b, b.detach().clone()) for b in engine.module.buffers()]
        self.skipped_before = getattr(engine, "skipped_steps", 0)
        self.bad = False

    def check(self, loss: torch.Tensor, *grads: torch.Tensor) -> None:
        tensors = (loss.detach(), *grads)
        self.bad = self.bad or not all(bool(torch.isfinite(t).all()) for t in tensors)

    def engine_step(self, micro: int) -> None:
        """The engine's step; on the last micro-step all ranks agree first, and a bad step changes nothing."""
        if micro == self.grad_accumulation - 1:
            self.bad = any_rank(self.bad)
            if self.bad:
                with update_disabled(self.engine):
                    self.engine.step()
                return
        self.engine.step()

    def finish(self) -> bool:
        self.bad = self.bad or getattr(self.engine, "skipped_steps", 0) != self.skipped_before  # DS overflow
        if self.bad:
            with torch.no_grad():
                for live, saved in self.buffers:
                    live.copy_(saved)
        return self.bad


def train_step(run: ModeRun, batches: Iterator, ctx: StepContext, inject_nan: bool = False) -> StepResult:
    """Run `ctx.grad_accumulation` micro-steps of the mode `run` and one optimizer step of backbone and head
    (or skip it, see the module docstring); the mode supplies the loss and its own per-step finish."""
    engine, gas = ctx.engine, ctx.grad_accumulation
    for group in engine.optimizer.param_groups:
        group["lr"] = ctx.lr_backbone
    run.begin_step(ctx)
    guard = LossGuard(engine, gas)
    loss_sum: torch.Tensor | None = None  # on the loss's device (a CPU tensor cannot add a CUDA one in place)
    wait = head_s = 0.0
    stats: dict = {}
    for micro in range(gas):
        ctx.micro = micro
        t0 = ctx.clock()
        batch = next(batches)
        wait += ctx.clock() - t0
        out = run.micro_step(ctx, batch)
        loss, stats = out.loss, out.stats
        if inject_nan:
            loss = loss * float("nan")
        t1 = ctx.clock()
        (loss / gas).backward()
        head_s += out.head_s + ctx.clock() - t1
        guard.check(loss, *(leaf.grad for _, leaf in out.pairs))
        surrogate = sum((live.float() * leaf.grad).sum() for live, leaf in out.pairs)
        engine.backward(surrogate * (ctx.world_size * gas))
        guard.engine_step(micro)
        value = loss.detach().double()
        loss_sum = value if loss_sum is None else loss_sum + value
    t2 = ctx.clock()
    bad = guard.finish()
    run.finish_step(ctx, bad)
    head_s += ctx.clock() - t2
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return StepResult(
        loss=float(loss_sum) / gas,
        data_wait_s=wait,
        grad_norm=float(norm) if norm is not None else None,
        head_s=head_s,
        head_stats=stats,
        skipped=bad,
    )
