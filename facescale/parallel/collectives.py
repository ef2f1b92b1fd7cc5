"""Row-wise collectives for the model-parallel head: all-gather with a reduce-scatter backward, and helpers.

Every function also works without an initialised process group (a world of one), so the head runs
single-process for tests and single-device training with no special case in the caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.10 renamed the flat-tensor collectives; keep working on both spellings.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed(group: Any = None) -> bool:
    """True when collectives must actually communicate (an initialised group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) within `group`, or (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_gather_ints(values: list[int], device: torch.device, group: Any = None) -> list[list[int]]:
    """Every rank's short list of ints (same length on all ranks), in rank order; one tiny collective."""
    local = torch.tensor(values, dtype=torch.int64, device=device)
    if not is_distributed(group):
        return [local.tolist()]
    gathered = torch.empty(dist.get_world_size(group) * len(values), dtype=torch.int64, device=device)
    _all_gather_flat(gathered, local, group=group)
    return gathered.view(-1, len(values)).tolist()


def batch_size_mismatch(sizes: list[int]) -> str | None:
    """The error text for unequal per-rank batch sizes, or None when they are all equal."""
    if len(set(sizes)) <= 1:
        return None
    return (
        f"per-rank batch sizes differ: {sizes} (rank i holds entry i). The class-center head needs the "
        "same number of rows on every rank: drop the last partial batch (drop_last) or pad it."
    )


def check_equal_batch_sizes(batch_size: int, device: torch.device, group: Any = None) -> None:
    """Raise the same clear error on every rank unless all ranks hold `batch_size` rows."""
    message = batch_size_mismatch([row[0] for row in all_gather_ints([batch_size], device, group)])
    if message:
        raise ValueError(message)


def all_gather_rows(tensor: Tensor, group: Any = None) -> Tensor:
    """Concatenate equal-sized row blocks from every rank in rank order (no autograd)."""
    if not is_distributed(group):
        return tensor
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_flat(out, tensor, group=group)
    return out


def reduce_scatter_rows(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum `tensor` ([W*B, ...]) over ranks; return this rank's rows [rank*B:(rank+1)*B], in one collective.

    Uses the native reduce-scatter (NCCL; gloo in recent torch). A backend that lacks it falls back to
    all_reduce followed by slicing, which moves W times more data but gives the same result.
    """
    if not is_distributed(group):
        return tensor
    rank, world = rank_and_world(group)
    if tensor.shape[0] % world:
        raise ValueError(f"reduce_scatter_rows: {tensor.shape[0]} rows do not split over {world} ranks")
    tensor = tensor.contiguous()
    rows = tensor.shape[0] // world
    out = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    try:
        _reduce_scatter_flat(out, tensor, group=group)
    except (RuntimeError, NotImplementedError):
        if dist.get_backend(group) == "nccl":
            raise
        return reduce_scatter_rows_by_all_reduce(tensor, group)
    return out


def reduce_scatter_rows_by_all_reduce(tensor: Tensor, group: Any = None) -> Tensor:
    """Fallback reduce-scatter: all_reduce(SUM) a copy, keep this rank's row block."""
    rank, world = rank_and_world(group)
    summed = tensor.clone()
    if world > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    rows = tensor.shape[0] // world
    return summed[rank * rows : (rank + 1) * rows].clone()


def all_reduce_(tensor: Tensor, op: Any, group: Any = None) -> Tensor:
    """In-place all_reduce that is a no-op in a world of one; returns `tensor`."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _AllGatherRowsWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: reduce-scatter, so each rank gets d(global loss)/d(its rows)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return all_gather_rows(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return reduce_scatter_rows(grad, ctx.group), None


def all_gather_rows_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """Autograd-aware row all-gather: the gradient of every rank's copy of our rows is summed back to us.

    Each rank computes a loss term from the gathered batch; the gradient for rank i's rows is the sum of
    the contributions of all ranks, which is what one reduce-scatter delivers. No 1/W or xW factor.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherRowsWithGrad.apply(tensor, group)
