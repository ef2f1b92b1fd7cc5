"""One optimizer step across the two worlds: the backbone in DeepSpeed, the class centers outside it.

Decoupled backward: the head sees detached embeddings, computes the exact global loss and its gradient w.r.t.
this rank's embeddings (the all-gather's backward is a reduce-scatter), steps its own optimizer, and the
gradient is handed to the engine through the surrogate `sum(emb * grad)`. DeepSpeed averages backbone
gradients over the W data-parallel ranks and divides by the accumulation steps, so the surrogate is scaled by
W * GAS to make the backbone gradient that of the global-mean loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    """What one optimizer step produced (loss averaged over its micro-steps)."""

    loss: float
    data_wait_s: float
    grad_norm: float | None
    head_s: float = 0.0  # wall time in the class-center layer: forward, backward, optimizer step
    head_stats: dict = field(default_factory=dict)


def train_step(
    engine,
    head,
    batches: Iterator,
    step: int,
    lr_backbone: float,
    lr_head: float,
    world_size: int,
    grad_accumulation: int,
    clock,
) -> StepResult:
    """Run `grad_accumulation` micro-steps and one optimizer step of backbone and head."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_backbone
    head.zero_grad()
    loss_sum = torch.zeros((), dtype=torch.float64)
    wait = head_s = 0.0
    stats: dict = {}
    for _ in range(grad_accumulation):
        t0 = clock()
        images, labels = next(batches)
        wait += clock() - t0
        embeddings = engine(images)
        detached = embeddings.detach().float().requires_grad_(True)
        t1 = clock()
        loss, stats = head(detached, labels, step)
        (loss / grad_accumulation).backward()
        head_s += clock() - t1
        surrogate = (embeddings.float() * detached.grad).sum() * (world_size * grad_accumulation)
        engine.backward(surrogate)
        engine.step()
        loss_sum += loss.detach().double()
    t2 = clock()
    head.optimizer_step(lr_head)
    head_s += clock() - t2
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    norm = float(norm) if norm is not None else None
    return StepResult(
        loss=float(loss_sum) / grad_accumulation,
        data_wait_s=wait,
        grad_norm=norm,
        head_s=head_s,
        head_stats=stats,
    )
