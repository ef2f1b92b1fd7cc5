"""The model-parallel class-center head (Partial FC): sharded centers, sampling, margin softmax, optimizer.

Centers are a buffer, not an nn.Parameter: no other optimizer (DeepSpeed's included) ever sees them, and
`optimizer_step(lr)` updates them with the head's own CenterOptimizer (dense or sparse, see that module).
Per step, `forward` all-gathers embeddings (gradient-aware) and labels, samples this shard's centers,
and returns the global-mean margin softmax loss; `loss.backward()` fills the local embedding grads with
d(global mean loss)/d(local rows) and stashes the sampled-center grads in factored form (`CenterGrad`), which
`optimizer_step` turns into rows block by block as it updates them (no [C', D] or [C, D] gradient tensor).

Timing for logs: `last_forward_ms`, `last_backward_ms` (from the loss's gradient arriving to the local
embeddings' gradient being ready, i.e. the head's part of backward) and `last_optimizer_ms`, summed over the
micro-steps of one optimizer step; `last_step_ms` is their total, set by `optimizer_step`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from facescale.heads.block_init import init_center_rows
from facescale.heads.center_optimizer import RESIDUAL, CenterOptimizer
from facescale.heads.cpu_threads import small_ops_serial
from facescale.heads.dist_cross_entropy import margin_cross_entropy
from facescale.heads.heap import keep_step_buffers_in_heap
from facescale.heads.margins import MarginSoftmaxSpec
from facescale.heads.native import center_kernels, native_kernels_for
from facescale.heads.norm_linear import CenterGrad, inverse_row_norms, norm_linear
from facescale.heads.sampling import num_samples_for, sample_centers, sampling_seed
from facescale.parallel.collectives import (
    all_gather_ints,
    all_gather_rows,
    all_gather_rows_with_grad,
    batch_size_mismatch,
    is_distributed,
    rank_and_world,
)
from facescale.parallel.partition import class_partition

_MISMATCH_FIX = {  # what to do when a saved shard does not fit, by the first metadata key that differs
    "num_classes": "the checkpoint was trained on another number of identities, so it cannot be resumed on "
    "this data (data.shards); to start a new run from its backbone set model.init_from to it and "
    "checkpoint.resume=none",
    "embedding_size": "set model.embedding_size to the checkpoint's, or start a new run from its backbone "
    "with model.init_from and model.init_strict: false",
    "start": "the shard was cut for another world size; resuming reshards automatically, so the checkpoint's "
    "trainer.json world_size does not match its head shards: run `facescale reshard` on it",
}


class PartialFCHead(torch.nn.Module):
    """This rank's shard of class centers plus sampling, loss and optimizer (see module docstring)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: MarginSoftmaxSpec,
        *,
        seed: int,
        sample_rate: float = 1.0,
        optimizer: str = "sgd",
        update: str = "dense",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        storage_dtype: torch.dtype = torch.float32,
        init_std: float = 0.01,
        process_group: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"num_classes ({num_classes}) and embedding_size ({embedding_size}) must be >= 1"
            )
        self.group = process_group
        self.rank, self.world_size = rank_and_world(process_group)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.start, self.count = class_partition(num_classes, self.world_size, self.rank)
        self.margin, self.seed, self.sample_rate = margin, seed, sample_rate
        self.num_sample = num_samples_for(sample_rate, self.count)
        centers = init_center_rows(self.start, self.count, embedding_size, init_std, seed, storage_dtype)
        # the raw rows; `centers` (the property) first applies any deferred dense steps
        self.register_buffer("center_rows", centers.to(device=device), persistent=False)
        if self.center_rows.device.type == "cpu":
            keep_step_buffers_in_heap()  # the step's temporaries reused, not paged in afresh (heads/heap.py)
        self.center_optimizer = CenterOptimizer(
            self.count,
            embedding_size,
            kind=optimizer,
            mode=update,
            momentum=momentum,
            weight_decay=weight_decay,
            betas=betas,
            state_dtype=storage_dtype,
            device=device,
            defer_dense=True,  # every read of the rows goes through `centers` or the catch-up gather
        )
        self._pending: list[tuple[Tensor | None, CenterGrad]] = []  # (sampled index, its center gradient)
        self.last_sampled_classes: Tensor | None = None  # global class ids used by the last forward
        self._buffers_by_name: dict[str, Tensor] = {}  # step-sized buffers reused across steps
        self._inv_norms: Tensor | None = None  # 1/||center|| per row, refreshed by optimizer_step
        self._inv_norms_key: tuple | None = None  # (storage, version, dtype) of centers it matches
        self._timing = {"forward": 0.0, "backward": 0.0}  # seconds, accumulated over pending micro-steps
        self._backward_started = 0.0
        self.last_forward_ms = self.last_backward_ms = self.last_optimizer_ms = self.last_step_ms = 0.0

    def forward(
        self, local_embeddings: Tensor, local_labels: Tensor, step: int, micro: int = 0
    ) -> tuple[Tensor, dict[str, Any]]:
        """Global mean margin softmax loss (same on every rank) and stats for this step's sample; `micro`, the
        micro-step within a gradient-accumulation step, gives each micro-step its own negatives."""
        if center_kernels() is None:  # the torch fallback's [N, C'] passes want every thread
            return self._forward(local_embeddings, local_labels, step, micro)
        with small_ops_serial(self.center_rows.device):  # small ops on this thread (heads/cpu_threads.py)
            return self._forward(local_embeddings, local_labels, step, micro)

    def _forward(
        self, local_embeddings: Tensor, local_labels: Tensor, step: int, micro: int
    ) -> tuple[Tensor, dict[str, Any]]:
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}], got {tuple(local_embeddings.shape)}"
            )
        if local_labels.shape != (local_embeddings.shape[0],):
            raise ValueError(
                f"labels must be [B] = [{local_embeddings.shape[0]}], got {tuple(local_labels.shape)}"
            )
        started = time.perf_counter()
        device = self.center_rows.device
        labels = local_labels.to(device=device, dtype=torch.long)
        self._check_batch_across_ranks(labels)
        local = local_embeddings.to(device)
        if local.requires_grad and torch.is_grad_enabled():
            local = local.view_as(local)  # a fresh graph node whose grad hook marks the end of our backward
            local.register_hook(self._backward_done)
        embeddings = all_gather_rows_with_grad(local, self.group)
        global_labels = all_gather_rows(labels, self.group)

        seed = sampling_seed(self.seed, self.rank, step, micro)  # a generator on `device` seeded with it
        sample = sample_centers(global_labels, self.start, self.count, self.num_sample, seed)
        inv_norms = self._center_inv_norms()
        # the first forward after an optimizer step may reuse last step's big buffers (nothing refers to them)
        reuse = torch.is_grad_enabled() and not self._pending
        if sample.index is None:
            weight = self.centers.detach().requires_grad_()
        else:
            weight = self._gather_rows(sample.index, reuse).requires_grad_()
            inv_norms = inv_norms.index_select(0, sample.index)
        logits_buffer = self._buffer("logits", (embeddings.shape[0], weight.shape[0]), reuse)
        center_grad = CenterGrad()
        if torch.is_grad_enabled():  # an evaluation forward under no_grad leaves nothing to apply
            self._pending.append((sample.index, center_grad))
        self.last_sampled_classes = self.start + (
            torch.arange(self.count, device=device) if sample.index is None else sample.index
        )
        loss = margin_cross_entropy(
            norm_linear(embeddings, weight, center_grad, inv_norms, logits_buffer),
            sample.target_col,
            self.margin,
            self.group,
            in_place=logits_buffer is not None,
        )
        if loss.requires_grad:
            loss.register_hook(self._backward_begins)
        width = self.count if sample.index is None else int(sample.index.numel())
        stats = {
            "num_sampled": width,
            "num_positive": sample.positive_count,  # 0-d tensors: read when logged, not here (CUDA sync)
            "positive_fraction": sample.positive_count / width if width else 0.0,
        }
        self._timing["forward"] += time.perf_counter() - started
        return loss, stats

    def _buffer(self, name: str, shape: tuple[int, int], reuse: bool) -> Tensor | None:
        """A per-step [rows, cols] buffer kept across steps (fresh big tensors pay page faults each step);
        None when it may not be reused (another forward's tensors still point at it)."""
        if not reuse:
            return None
        dtype = self.center_rows.dtype
        if name != "weight":
            dtype = torch.promote_types(dtype, torch.float32)
        buffer = self._buffers_by_name.get(name)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, device=self.center_rows.device)
            self._buffers_by_name[name] = buffer
        return buffer

    def _gather_rows(self, index: Tensor, reuse: bool) -> Tensor:
        """centers[index] into the reused weight buffer (or a fresh tensor), rows brought up to date first
        when dense steps were deferred (the catch-up writes the copy as it goes)."""
        rows = self.center_rows
        buffer = self._buffer("weight", (len(index), self.embedding_size), reuse)
        if buffer is None:
            buffer = torch.empty(len(index), self.embedding_size, dtype=rows.dtype, device=rows.device)
        buffer.requires_grad_(False)
        current = self.center_optimizer.gather_current(index, buffer)
        if current is not None:
            return current
        kernels = native_kernels_for(rows, buffer)
        if kernels is not None and index.is_contiguous():  # row memcpy: ~2x index_select's speed
            return kernels.gather_rows(rows, index, buffer)
        return torch.index_select(rows, 0, index, out=buffer)

    @property
    def centers(self) -> Tensor:
        """This rank's [count, D] centers with every row current (deferred dense steps applied first)."""
        self.center_optimizer.materialize()
        return self.center_rows

    def _centers_key(self) -> tuple:
        centers = self.center_rows
        return (centers.untyped_storage().data_ptr(), centers._version, centers.dtype, centers.device)

    def _center_inv_norms(self) -> Tensor:
        """1/||center|| for the shard: kept by optimizer_step, recomputed if anything else wrote centers."""
        if self._inv_norms is None or self._inv_norms_key != self._centers_key():
            dtype = torch.promote_types(self.center_rows.dtype, torch.float32)
            self._inv_norms = inverse_row_norms(self.centers, dtype)
            self._inv_norms_key = self._centers_key()
        return self._inv_norms

    def _backward_begins(self, grad: Tensor) -> None:
        self._backward_started = time.perf_counter()

    def _backward_done(self, grad: Tensor) -> None:
        if self._backward_started:
            self._timing["backward"] += time.perf_counter() - self._backward_started
            self._backward_started = 0.0

    def _check_batch_across_ranks(self, labels: Tensor) -> None:
        """One tiny all-gather of (batch size, bad labels) so every rank raises the same error together.

        A single CUDA process checks its labels with a device-side assert instead: no host synchronisation
        in the step (the run then stops with the same message, raised by the CUDA runtime)."""
        if labels.is_cuda and not is_distributed(self.group):
            if labels.shape[0] == 0:
                raise ValueError("empty batch: the class-center head needs at least one row per rank")
            torch._assert_async(
                ((labels >= 0) & (labels < self.num_classes)).all(),
                f"labels outside [0, {self.num_classes}): does the dataset's class count match the head's "
                "num_classes?",
            )
            return
        bad = int(((labels < 0) | (labels >= self.num_classes)).sum())
        info = all_gather_ints([labels.shape[0], bad], labels.device, self.group)
        message = batch_size_mismatch([size for size, _ in info])
        if message:
            raise ValueError(message)
        if any(size == 0 for size, _ in info):
            raise ValueError("empty batch: the class-center head needs at least one row per rank")
        if any(count for _, count in info):
            raise ValueError(
                f"labels outside [0, {self.num_classes}) on ranks "
                f"{[rank for rank, (_, count) in enumerate(info) if count]}: does the dataset's class "
                "count match the head's num_classes?"
            )

    def optimizer_step(self, lr: float) -> None:
        """Update the centers from the grads of every forward/backward since the last step, then clear them.

        `lr` is used as given: the trainer applies its schedule and head.lr_scale before calling.
        """
        if not self._pending:
            raise RuntimeError("optimizer_step() called without a preceding forward()")
        started = time.perf_counter()
        index, grad = self._collect_grads()
        inv_norms = (
            self._center_inv_norms()
        )  # valid now, so valid after the step refreshes the rows it writes
        self.center_optimizer.step(self.center_rows, grad, index, lr, inv_norms)
        self._inv_norms_key = self._centers_key()
        self._pending.clear()
        self.last_optimizer_ms = (time.perf_counter() - started) * 1e3
        self.last_forward_ms = self._timing["forward"] * 1e3
        self.last_backward_ms = self._timing["backward"] * 1e3
        self.last_step_ms = self.last_forward_ms + self.last_backward_ms + self.last_optimizer_ms
        self._timing = {"forward": 0.0, "backward": 0.0}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the stashed forward(s) and their center grads (the head keeps no other grad state)."""
        self._pending.clear()
        self._timing = {"forward": 0.0, "backward": 0.0}

    def _collect_grads(self) -> tuple[Tensor | None, Tensor | CenterGrad]:
        """One pending forward: its CenterGrad as is (formed lazily by the optimizer). Several (grad
        accumulation): each is materialised and they are summed per row."""
        for _, center_grad in self._pending:
            if not center_grad.ready:
                raise RuntimeError(
                    "no center gradient: call loss.backward() between forward() and optimizer_step()"
                )
        if len(self._pending) == 1:
            return self._pending[0]
        grads = [(index, center_grad.full()) for index, center_grad in self._pending]
        work_dtype = torch.promote_types(self.center_rows.dtype, torch.float32)
        if any(index is None for index, _ in grads):
            total = torch.zeros_like(self.center_rows, dtype=work_dtype)
            for index, grad in grads:
                if index is None:
                    total.add_(grad)
                else:
                    total.index_add_(0, index, grad.to(work_dtype))
            return None, total
        all_rows = torch.cat([index for index, _ in grads])
        merged, position = torch.unique(all_rows, sorted=True, return_inverse=True)
        device = self.center_rows.device
        total = torch.zeros(len(merged), self.embedding_size, dtype=work_dtype, device=device)
        total.index_add_(0, position, torch.cat([grad.to(work_dtype) for _, grad in grads]))
        return merged, total

    def metadata(self) -> dict[str, int]:
        """Where this shard sits in the global class range (saved with every state_dict)."""
        return {
            "num_classes": self.num_classes,
            "start": self.start,
            "count": self.count,
            "embedding_size": self.embedding_size,
        }

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """{"meta": metadata + optimizer kind, "centers": [count, D], "optimizer": {name: [count, ...]}},
        copied to the CPU (a copy beside them on the GPU would double the head's memory at every save)."""
        meta = dict(self.metadata(), optimizer=self.center_optimizer.kind, update=self.center_optimizer.mode)
        return {
            "meta": meta,
            "centers": self.centers.detach().to("cpu", copy=True),
            "optimizer": {k: v.detach().to("cpu", copy=True)
                          for k, v in self.center_optimizer.state_tensors().items()},
        }

    @torch.no_grad()
    def load_center_values(self, values: Tensor, optimizer_state: dict[str, Tensor] | None = None) -> None:
        """Start this shard from given centers ([count, D], fp32; e.g. another run's, head.init_from) with the
        given optimizer state rows (by the optimizer's buffer names), zero where none is given; bf16 storage
        keeps the centers' rounding error in its residual."""
        if tuple(values.shape) != (self.count, self.embedding_size):
            raise ValueError(f"centers of shape {tuple(values.shape)} for a shard of {self.count} x "
                             f"{self.embedding_size}")
        values = values.to(self.center_rows.device, torch.float32)
        self.center_rows.copy_(values)
        state = {k: torch.zeros_like(v) for k, v in self.center_optimizer.state_tensors().items()}
        for name, rows in (optimizer_state or {}).items():
            if name not in state or name == RESIDUAL or rows.shape != state[name].shape:
                raise ValueError(f"optimizer state {name} of shape {tuple(rows.shape)} does not fit this "
                                 f"shard's {sorted(state)}")
            state[name] = rows.to(state[name].device, state[name].dtype)
        if RESIDUAL in state:
            state[RESIDUAL] = (values - self.center_rows.float()).to(state[RESIDUAL].dtype)
        self.center_optimizer.load_state_tensors(state)
        self._pending.clear()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a shard saved by `state_dict`; its metadata must describe exactly this shard. A shard saved
        with another head.storage_dtype loads the value it held (bf16 centers plus their residual), a half
        precision shard keeping the rounding error in its residual, as `load_center_values` does."""
        meta = state_dict.get("meta")
        if meta is None or "centers" not in state_dict:
            raise ValueError("not a Partial FC head state: expected keys 'meta', 'centers', 'optimizer'")
        for key, value in self.metadata().items():
            if meta.get(key) != value:
                fix = _MISMATCH_FIX.get(key, _MISMATCH_FIX["start"])
                raise ValueError(
                    f"head checkpoint has {key}={meta.get(key)} but this rank needs {value} "
                    f"(rank {self.rank} of {self.world_size}); {fix}"
                )
        centers, optimizer = state_dict["centers"], dict(state_dict.get("optimizer", {}))
        if centers.dtype == self.center_rows.dtype:  # as saved, bit for bit
            self.center_rows.copy_(centers)
        else:
            residual = optimizer.pop(RESIDUAL, None)
            values = centers.float() if residual is None else centers.float() + residual.float()
            values = values.to(self.center_rows.device)
            self.center_rows.copy_(values)
            if hasattr(self.center_optimizer, RESIDUAL):
                optimizer[RESIDUAL] = values - self.center_rows.float()
        self.center_optimizer.load_state_tensors(optimizer)
        self._pending.clear()
        return None
