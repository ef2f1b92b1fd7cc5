"""Margin softmax cross-entropy over class columns sharded across ranks, exact and in fp32.

Each rank holds cosines [N, C_local] for the whole global batch against its own (sampled) centers. The
softmax over all shards needs two collectives: all-reduce MAX of the row max, then one SUM all-reduce of
(sum-exp, target logit) stacked together. The loss is the mean over the N global rows, identical on every
rank. Backward is analytic: d loss / d logit = (softmax - onehot) * upstream / N, with no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from facescale.heads.cpu_threads import all_threads, small_ops_serial
from facescale.heads.margins import MarginSoftmaxSpec
from facescale.heads.native import native_kernels_for
from facescale.parallel.collectives import all_reduce_


def _filtered_negatives(cos: Tensor, target_col: Tensor, threshold: float) -> Tensor:
    """Mask of negatives whose cosine exceeds the inter-class threshold (never a row's own target)."""
    mask = cos > threshold
    if mask.shape[1]:
        safe_col = target_col.clamp_min(0)[:, None]
        keep = mask.gather(1, safe_col) & (target_col < 0)[:, None]  # rows without a local target keep theirs
        mask.scatter_(1, safe_col, keep)
    return mask


class _MarginCrossEntropy(torch.autograd.Function):
    """Fused margin + scale + filter + distributed softmax cross-entropy; see `margin_cross_entropy`."""

    @staticmethod
    def forward(
        ctx: Any, cos: Tensor, target_col: Tensor, spec: MarginSoftmaxSpec, group: Any, in_place: bool
    ) -> Tensor:
        acc_dtype = torch.promote_types(cos.dtype, torch.float32)
        cos = cos.to(acc_dtype)
        num_rows = cos.shape[0]
        has_target = target_col >= 0
        safe_col = target_col.clamp_min(0)[:, None]
        with torch.enable_grad():  # the margin is elementwise on N values: let autograd differentiate it
            target_cos = (
                cos.gather(1, safe_col).squeeze(1).detach().requires_grad_()
                if cos.shape[1]
                else torch.zeros(num_rows, dtype=acc_dtype, device=cos.device, requires_grad=True)
            )
            target_logit = spec.target_margin(target_cos) * spec.scale
        target_logit_value = torch.where(has_target, target_logit.detach(), 0.0)

        in_place = in_place and spec.filter_threshold == 0 and cos.dtype == acc_dtype
        # in place on the CPU: the native passes scale + row max, then shift + exp + row sum, one pass each
        kernels = native_kernels_for(cos) if in_place and cos.shape[1] and cos.is_contiguous() else None
        if kernels is not None:
            logits = cos
            row_max = torch.empty_like(target_logit_value)
            kernels.scale_row_max_(logits, spec.scale, target_col, row_max)
        else:  # torch's [N, C'] passes: all threads, also inside the head's small_ops_serial (cpu_threads.py)
            with all_threads():
                logits = cos.mul_(spec.scale) if in_place else cos * spec.scale
                if spec.filter_threshold > 0:  # (never in place, so never with the native passes)
                    logits.masked_fill_(_filtered_negatives(cos, target_col, spec.filter_threshold), 0.0)
        if cos.shape[1]:
            current = logits.gather(1, safe_col).squeeze(1)
            logits.scatter_(1, safe_col, torch.where(has_target, target_logit_value, current)[:, None])
            if kernels is None:
                with all_threads():
                    row_max = logits.amax(dim=1)
            else:  # the max without the target column, then with its margin logit
                row_max = torch.maximum(row_max, target_logit_value.masked_fill(~has_target, float("-inf")))
        else:
            row_max = torch.full((num_rows,), float("-inf"), dtype=acc_dtype, device=cos.device)
        all_reduce_(row_max, dist.ReduceOp.MAX, group)

        if kernels is None:
            with all_threads():
                exps = logits.sub_(row_max[:, None]).exp_()
                sum_exp_local = exps.sum(dim=1)
        else:
            exps = logits
            sum_exp_local = kernels.exp_row_sums_(exps, row_max, torch.empty_like(row_max))
        sums = torch.stack([sum_exp_local, target_logit_value])  # [2, N]: sum-exp, target logit
        all_reduce_(sums, dist.ReduceOp.SUM, group)
        sum_exp, global_target_logit = sums[0], sums[1]
        loss = (sum_exp.log() + row_max - global_target_logit).mean()

        ctx.spec, ctx.num_rows, ctx.in_place = spec, num_rows, in_place
        # exp(logit - max) is kept unnormalised: backward divides by sum_exp in the pass that scales it
        ctx.save_for_backward(exps, cos if spec.filter_threshold > 0 else None, target_col, sum_exp)
        ctx.margin_graph = (target_cos, target_logit)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if not ctx.in_place:  # not the head's buffer chain: leave torch's threading alone
            return _MarginCrossEntropy._backward(ctx, grad_loss)
        with small_ops_serial(grad_loss.device):  # small ops on this thread, [N, C'] passes on all
            return _MarginCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        exps, cos, target_col, sum_exp = ctx.saved_tensors
        spec = ctx.spec
        target_cos, target_logit = ctx.margin_graph
        has_target = target_col >= 0
        safe_col = target_col.clamp_min(0)[:, None]
        grad_logit_scale = grad_loss.to(exps.dtype) / ctx.num_rows
        # d loss/d cos = softmax * upstream * s / N for non-target, unfiltered columns: one pass over exps
        row_factor = (grad_logit_scale * spec.scale / sum_exp)[:, None]
        with all_threads():
            grad = exps.mul_(row_factor) if ctx.in_place else exps * row_factor
        if spec.filter_threshold > 0:
            grad.masked_fill_(_filtered_negatives(cos, target_col, spec.filter_threshold), 0.0)
        if grad.shape[1]:
            target_prob = grad.gather(1, safe_col).squeeze(1) / spec.scale  # = p_t * upstream / N
            grad_target_logit = torch.where(has_target, target_prob - grad_logit_scale, 0.0)
            (grad_target_cos,) = torch.autograd.grad(
                target_logit, target_cos, grad_target_logit, retain_graph=True
            )
            current = grad.gather(1, safe_col).squeeze(1)
            grad.scatter_(1, safe_col, torch.where(has_target, grad_target_cos, current)[:, None])
        return grad, None, None, None, None


def margin_cross_entropy(
    cos: Tensor, target_col: Tensor, spec: MarginSoftmaxSpec, group: Any = None, in_place: bool = False
) -> Tensor:
    """Global-mean margin softmax loss from local cosines [N, C_local] and target columns [N] (-1: not here).

    Every global row must have its target column on exactly one rank. The result is the same scalar on
    every rank; backward gives d loss/d cos for the local columns only (no collective needed).
    `in_place` (used by the head with its reused buffer): `cos` is overwritten by the logits, then the
    exponentials, then the gradient, instead of allocating three more [N, C_local] tensors (ignored with the
    inter-class filter, which needs the cosines in backward).
    """
    if cos.dim() != 2 or target_col.shape != (cos.shape[0],):
        raise ValueError(
            f"cos must be [N, C] and target_col [N]; got {tuple(cos.shape)}, {tuple(target_col.shape)}"
        )
    return _MarginCrossEntropy.apply(cos, target_col.long().contiguous(), spec, group, in_place)
