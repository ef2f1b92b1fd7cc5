"""Backbone gradient all-reduce overlapped with backward, for DeepSpeed ZeRO stage 0.

At stage 0 DeepSpeed all-reduces every gradient in one flat buffer after backward has finished, so the
communication adds to the step. torch DDP instead launches each bucket of gradients as soon as backward has
produced it, and the reduction runs while backward computes the rest. `overlap_grad_reduce(engine)` gives
the engine that behaviour: buckets of about `bucket_mb` in reverse parameter order (the order backward
produces them; the first one closed at about `first_bucket_mb`, as DDP does, so that the reduction starts
as soon as the last layers have their gradients), launched asynchronously in a fixed order on every rank,
waited for and copied back where DeepSpeed would have reduced (its `allreduce_gradients`, at the
gradient-accumulation boundary only). The arithmetic is DeepSpeed's: a SUM all-reduce in the gradients'
dtype, then a multiply by 1 / world size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_BUCKET_MB = 25.0  # torch DDP's default bucket size
# torch DDP's first bucket (1 MiB): without it a net whose last layer holds most of its weights (the demo
# net's fc: 9 of 10 MB) would send everything in one bucket after backward, with nothing to overlap
FIRST_BUCKET_MB = 1.0


class _Bucket:
    """Parameters reduced together: the flat buffer is filled when the last of them has its gradient."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.ready = params, set()
        self.flat: Tensor | None = None  # the bucket's gradients, flat; reused every step
        self.work: Any = None


class GradReduceOverlap:
    """The hooks and buckets attached to one engine for its trainable `params` (see the module docstring)."""

    def __init__(
        self, engine: Any, params: list[torch.nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB,
        first_bucket_mb: float = FIRST_BUCKET_MB,
    ) -> None:
        from deepspeed.utils import groups

        self.engine = engine
        self.group = groups._get_sequence_data_parallel_group()  # the group DeepSpeed reduces over
        self.world = dist.get_world_size(self.group) / float(engine.sequence_parallel_size)
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for param in reversed(params):
            current.append(param)
            size += param.numel() * param.element_size()
            if size >= (bucket_mb if self.buckets else min(first_bucket_mb, bucket_mb)) * 2**20:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}
        self.next_launch = 0
        for param in params:
            param.register_post_accumulate_grad_hook(self._grad_ready)
        engine.allreduce_gradients = self.finish  # DeepSpeed calls it after backward (stage 0)

    def _grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return  # earlier micro-steps only accumulate locally, as with DeepSpeed
        bucket = self.bucket_of[id(param)]
        if id(param) in bucket.ready:  # a second accumulation: its gradient may already have been sent
            raise RuntimeError(
                f"a gradient of shape {tuple(param.shape)} was accumulated twice in one backward (a weight "
                "used by two checkpointed segments?): the overlapped all-reduce cannot serve it; set "
                "deepspeed.zero_stage: 1 for this backbone"
            )
        bucket.ready.add(id(param))
        while self.next_launch < len(self.buckets) and self._complete(self.buckets[self.next_launch]):
            self._launch(self.buckets[self.next_launch])  # strictly in bucket order: ranks must agree
            self.next_launch += 1

    @staticmethod
    def _complete(bucket: _Bucket) -> bool:
        return len(bucket.ready) == len(bucket.params)

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = bucket.flat
        if flat is None or flat.dtype != grads[0].dtype or flat.device != grads[0].device:
            # kept across steps, as DDP keeps its buckets: a fresh 25 MB buffer per bucket and step would
            # page-fault its way in on the CPU
            flat = bucket.flat = torch.empty(sum(g.numel() for g in grads), dtype=grads[0].dtype,
                                             device=grads[0].device)
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)

    def finish(self, *args: Any, **kwargs: Any) -> None:
        """Launch what backward did not complete (unused parameters), wait, average, copy back; reset."""
        if not self.engine.is_gradient_accumulation_boundary():
            return
        for bucket in self.buckets[self.next_launch :]:
            self._launch(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            flat = bucket.flat.mul_(1.0 / self.world)
            offset = 0
            for param in bucket.params:
                count = param.numel()
                part = flat[offset : offset + count].view_as(param)
                if param.grad is None:
                    param.grad = part.clone()
                else:
                    param.grad.copy_(part)
                offset += count
            bucket.work = None
            bucket.ready.clear()
        self.next_launch = 0


def overlap_grad_reduce(engine: Any, bucket_mb: float = DEFAULT_BUCKET_MB) -> GradReduceOverlap | None:
    """Attach the overlapped reduction to a ZeRO stage 0 engine of several ranks; None where it does not
    apply (other stages reduce in their own optimizer; a different communication dtype, sparse gradients
    keep DeepSpeed's path). With one rank there is nothing to reduce: DeepSpeed's stage-0 path would still
    flatten every gradient, all-reduce it with itself and copy it back each step (~75 ms for r18 on one CPU
    thread), so that call is dropped; the gradients are bitwise what it would leave."""
    if engine.zero_optimization_stage() != 0 or not dist.is_initialized():
        return None
    if engine.pipeline_parallelism or engine.has_moe_layers:
        return None
    if not getattr(engine, "enable_backward_allreduce", True):
        return None
    params = [p for p in engine.module.parameters() if p.requires_grad]
    comm_dtype = getattr(engine, "communication_data_type", None)
    sparse = getattr(engine, "sparse_gradients_enabled", lambda: False)()
    if sparse or any(p.dtype != comm_dtype for p in params):
        return None
    if dist.get_world_size() == 1:
        engine.allreduce_gradients = _nothing_to_reduce
        return None
    return GradReduceOverlap(engine, params, bucket_mb)


def _nothing_to_reduce(*args: Any, **kwargs: Any) -> None:
    """DeepSpeed's gradient all-reduce on a single rank: the identity."""
