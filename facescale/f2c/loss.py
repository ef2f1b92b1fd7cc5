"""F2C's loss over one pool view (reference `add_margin`): margin softmax for pooled probes, top-K push-away
for the others, each averaged over its own subset of the global batch and added 1:1.

    L_cls(W) = mean_{i in P} CE(s * psi(z_i, y_i), y_i)          z_i = W p_i, over the Q pool slots only
    L_neg(W) = mean_{i in O, k in TopK(z_i)} max(z_ik, 0)          K = clamp(floor(0.0002 Q), 3, 10)

P / O are the probes whose label is / is not pooled, taken over all ranks (so the loss is the same on every
rank and its gradient w.r.t. a rank's probes is that of the global loss). `local_view_loss` serves the
replicated pool (each rank scores its own probes against the whole pool); `sharded_view_loss` serves the
sharded pool (all probes against this rank's slots, distributed softmax and distributed top-K).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from facescale.heads.dist_cross_entropy import margin_cross_entropy
from facescale.heads.margins import MarginSoftmaxSpec
from facescale.parallel.collectives import all_gather_rows, rank_and_world

_BELOW_ANY_COSINE = -3.0  # pads a shard's top-K when it holds fewer than K slots; never selected


def outlier_top_k(queue_size: int) -> int:
    """K = clamp(floor(0.0002 * Q), 3, 10), as the reference; at most Q for a pool of fewer than 3 slots."""
    return min(queue_size, max(3, min(10, math.floor(0.0002 * queue_size))))


def local_margin_cross_entropy(cos: Tensor, targets: Tensor, spec: MarginSoftmaxSpec) -> Tensor:
    """Mean margin softmax CE of rows whose every column is local (the same margin, scale and inter-class
    filter as the distributed version, without its collectives), by plain autograd."""
    column = targets[:, None]
    logits = cos * spec.scale
    if spec.filter_threshold > 0:
        filtered = (cos > spec.filter_threshold).scatter(1, column, False)
        logits = logits.masked_fill(filtered, 0.0)
    target_logit = spec.target_margin(cos.gather(1, column)) * spec.scale
    return torch.nn.functional.cross_entropy(logits.scatter(1, column, target_logit), targets)


def local_view_loss(
    probes: Tensor, targets: Tensor, weight: Tensor, spec: MarginSoftmaxSpec, k: int, totals: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """This rank's share of (L_cls, L_neg) for one view of a replicated pool.

    `probes` [n, D] normalised, `targets` [n] slot or -1, `weight` [Q, D]; `totals` = (|P|, |O|) over all
    ranks. Summed over ranks the shares give the global L_cls and L_neg.
    """
    cos = probes @ weight.t()
    pooled = targets >= 0
    zero = cos.sum() * 0.0
    cls, neg = zero, zero
    num_pooled = int(pooled.sum())
    if num_pooled:
        cls = local_margin_cross_entropy(cos[pooled], targets[pooled], spec) * (num_pooled / totals[0])
    if num_pooled < len(targets):
        top = torch.topk(cos[~pooled], k, dim=1).values
        neg = top.clamp_min(0.0).sum() / (k * totals[1])
    return cls, neg


class _GatherColumnsOfOneLoss(torch.autograd.Function):
    """Concatenate every rank's columns; backward keeps this rank's block (every rank computes the same loss
    from the gathered values, so summing the copies' gradients would count it W times)."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any) -> Tensor:
        rank, world = rank_and_world(group)
        ctx.block = (rank, local.shape[1])
        gathered = all_gather_rows(local.t().contiguous(), group)  # [W * k, n]
        return gathered.t().contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        rank, width = ctx.block
        return grad[:, rank * width : (rank + 1) * width].contiguous(), None


def distributed_top_k(cos: Tensor, k: int, group: Any = None) -> Tensor:
    """Top-k of each row over the columns of all ranks: local top-k (padded to k), all-gather, top-k."""
    local_k = min(k, cos.shape[1])
    local = torch.topk(cos, local_k, dim=1).values
    if local_k < k:
        pad = torch.full((cos.shape[0], k - local_k), _BELOW_ANY_COSINE, dtype=cos.dtype, device=cos.device)
        local = torch.cat([local, pad], dim=1)
    if rank_and_world(group)[1] == 1:
        return torch.topk(local, k, dim=1).values
    return torch.topk(_GatherColumnsOfOneLoss.apply(local, group), k, dim=1).values


def sharded_view_loss(
    probes: Tensor,
    targets: Tensor,
    pooled: Tensor,
    weight: Tensor,
    spec: MarginSoftmaxSpec,
    k: int,
    group: Any = None,
) -> tuple[Tensor, Tensor]:
    """(L_cls, L_neg) of one view of a sharded pool, identical on every rank.

    `probes` [N, D] are all ranks' normalised probes (gathered with a gradient-aware all-gather),
    `targets` [N] the local slot of each probe's label or -1, `pooled` [N] whether it is pooled on any rank,
    `weight` [Q_local, D] this rank's slots.
    """
    cos = probes @ weight.t()
    zero = cos.sum() * 0.0
    cls, neg = zero, zero
    num_pooled = int(pooled.sum())
    if num_pooled:
        cls = margin_cross_entropy(cos[pooled], targets[pooled], spec, group)
    if num_pooled < len(pooled):
        top = distributed_top_k(cos[~pooled], k, group)
        neg = top.clamp_min(0.0).mean()
    return cls, neg
