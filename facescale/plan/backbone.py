"""Backbone size and activation memory from a forward pass on the meta device (no real tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from facescale.config.schema import ModelConfig
from facescale.runtime import PRECISION_DTYPES

PROBE_BATCH = 2  # BatchNorm in training mode needs more than one sample; activations scale linearly in B


@dataclass(frozen=True)
class BackboneStats:
    """Parameter counts (all / trainable) and the bytes autograd keeps per sample for backward."""

    name: str
    num_params: int
    activation_bytes_per_sample: int
    num_trainable: int = -1  # -1: all parameters are trainable
    buffer_bytes: int = 0  # module buffers (BatchNorm statistics) in their own dtypes, parameters in fp32

    @property
    def trainable(self) -> int:
        return self.num_params if self.num_trainable < 0 else self.num_trainable


def saved_tensor_bytes(model: nn.Module, images: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward, parameters excluded.

    Each storage is counted once (views share it), which is what the allocator holds until backward.
    """
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            seen[storage._cdata] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(seen.values())


def backbone_stats(cfg: ModelConfig, precision: str = "bf16", image_size: int = 112) -> BackboneStats:
    """Build `cfg.name` on the meta device and measure it; activations in the compute dtype of `precision`.

    bf16/fp16 are modelled by running the whole forward in that dtype (autocast keeps a few small ops, e.g.
    normalisation statistics, in fp32, so the real figure is slightly higher). With activation checkpointing
    the estimate is the checkpointed inputs plus one block's activations (recomputed during backward).
    """
    from facescale.models.registry import build_backbone

    dtype = PRECISION_DTYPES[precision]
    with torch.device("meta"):
        model = build_backbone(cfg)
        images = torch.empty(PROBE_BATCH, 3, image_size, image_size)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    model = model.to(dtype)
    num_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = saved_tensor_bytes(model, images.to(dtype))
    if getattr(model, "activation_checkpointing", False):
        # checkpointed blocks keep only their inputs; backward recomputes one block at a time on top
        model.activation_checkpointing = False
        full = saved_tensor_bytes(model, images.to(dtype))
        model.activation_checkpointing = True
        saved += (full - saved) // max(1, len(getattr(model, "blocks", [None])))
    per_sample = saved // PROBE_BATCH
    return BackboneStats(cfg.name, num_params, per_sample, trainable, buffer_bytes)
