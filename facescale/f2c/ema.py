"""G-Net: an fp32 EMA copy of the DeepSpeed-trained backbone (P-Net) that embeds the gallery images.

`update(pnet)` runs once per iteration, before the G-Net forward: g = m * g + (1 - m) * p over the
parameters. BatchNorm, decided as in the reference: the running statistics are not averaged, and G-Net runs
in train mode, so its BatchNorm normalises each gallery batch with that batch's own statistics (its running
buffers change but are never used). G-Net's parameters have requires_grad=False and never see a gradient.
The copy is kept in fp32 even when P-Net trains in bf16 (a 1% step is below bf16 resolution); the forward
runs under autocast to P-Net's dtype. ZeRO-3 is refused by the config check: its partitioned parameters
would have to be gathered every step to feed a full replica that costs as much memory as not partitioning.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class GalleryNet(nn.Module):
    """The EMA twin of a backbone; `forward` gives L2-normalised gallery features without gradients."""

    def __init__(
        self,
        pnet: nn.Module,
        momentum: float,
        *,
        blank: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """Start as a copy of `pnet`: loaded into `blank` (a fresh model of the same architecture, which
        avoids deep-copying an engine-wrapped module and its hooks) or, without one, a deep copy."""
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"head.f2c.momentum = {momentum!r} must be in [0, 1) (0.99 in F2C)")
        if any(hasattr(p, "ds_id") for p in pnet.parameters()):
            raise ValueError(
                "the backbone's parameters are ZeRO-3 partitions; head.type f2c needs "
                "deepspeed.zero_stage 0, 1 or 2 (G-Net is a full replica on every rank)"
            )
        net = copy.deepcopy(pnet) if blank is None else blank
        if blank is not None:
            net.load_state_dict(pnet.state_dict())
        self.net = net.float()
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.momentum = momentum
        self.autocast_dtype = autocast_dtype
        self.net.train()
        self._names = [name for name, _ in self.net.named_parameters()]

    @torch.no_grad()
    def update(self, pnet: nn.Module) -> None:
        """One EMA step towards P-Net's current parameters (matched by name)."""
        source = dict(pnet.named_parameters())
        if len(source) != len(self._names):
            raise ValueError(
                f"P-Net has {len(source)} parameters, G-Net {len(self._names)}: not the same model"
            )
        targets = [param for _, param in self.net.named_parameters()]
        values = [
            source[name].detach().to(param.dtype) for name, param in zip(self._names, targets, strict=True)
        ]
        torch._foreach_mul_(targets, self.momentum)
        torch._foreach_add_(targets, values, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Normalised fp32 features of `images` (train-mode BatchNorm: the batch's own statistics)."""
        self.net.train()
        device_type = images.device.type
        if self.autocast_dtype is not None and self.autocast_dtype != torch.float32:
            with torch.autocast(device_type, dtype=self.autocast_dtype):
                features = self.net(images)
        else:
            features = self.net(images.float())
        return nn.functional.normalize(features.float(), dim=1)

    def train(self, mode: bool = True) -> GalleryNet:
        """G-Net always stays in train mode (see the module docstring); the call is accepted and ignored."""
        super().train(True)
        return self
