"""One F2C optimizer step: EMA update, G-Net on both batches, P-Net on both, the two-pass pool loss.

Same decoupled backward as `facescale.train.step`: the head sees detached P-Net features, returns the global
loss, and its gradient goes to the engine through the surrogate sum(p * grad) scaled by W * GAS. The engine
runs two forwards (x, then y, so BatchNorm sees 1.5B-image batches as in the reference) and one backward.
With gradient accumulation every micro-step is one pool iteration (two passes, one committed insertion);
G-Net is updated once per optimizer step, before the first micro-step's G-Net forward.

Loss guard as in `facescale.train.step`: a non-finite loss or P-Net feature gradient on any rank skips the
backbone update and puts BatchNorm statistics back. The pool keeps that iteration's G-Net insertions: G-Net
is an EMA of P-Net, which only ever takes finite updates, so its features stay finite.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from facescale.train.step import LossGuard, StepResult


def dcp_train_step(
    engine,
    head,
    batches: Iterator,
    step: int,
    lr_backbone: float,
    lr_head: float,
    world_size: int,
    grad_accumulation: int,
    clock,
    inject_nan: bool = False,
) -> StepResult:
    """Run `grad_accumulation` micro-steps and one optimizer step (signature of `train_step`; the pool has
    no optimizer, so `lr_head` is unused)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_backbone
    guard = LossGuard(engine, grad_accumulation)
    loss_sum = torch.zeros((), dtype=torch.float64)
    wait = head_s = 0.0
    stats: dict = {}
    for micro in range(grad_accumulation):
        t0 = clock()
        (x_images, x_labels), (y_images, y_labels) = next(batches)
        wait += clock() - t0
        t1 = clock()
        if micro == 0:  # once per iteration, after the last optimizer step, before any G-Net forward
            head.update_gallery_net(engine.module)
        gallery_y = head.gallery_features(y_images)
        gallery_x = head.gallery_features(x_images)
        head_s += clock() - t1
        probe_x, probe_y = engine(x_images), engine(y_images)
        detached_x = probe_x.detach().float().requires_grad_(True)
        detached_y = probe_y.detach().float().requires_grad_(True)
        t2 = clock()
        loss, stats = head(detached_x, detached_y, x_labels, y_labels, gallery_x, gallery_y)
        if inject_nan:
            loss = loss * float("nan")
        (loss / grad_accumulation).backward()
        head_s += clock() - t2
        guard.check(loss, detached_x.grad, detached_y.grad)
        surrogate = (probe_x.float() * detached_x.grad).sum() + (probe_y.float() * detached_y.grad).sum()
        engine.backward(surrogate * (world_size * grad_accumulation))
        guard.engine_step(micro)
        loss_sum += loss.detach().double()
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    return StepResult(
        loss=float(loss_sum) / grad_accumulation,
        data_wait_s=wait,
        grad_norm=float(norm) if norm is not None else None,
        head_s=head_s,
        head_stats=stats,
        skipped=guard.finish(),
    )
