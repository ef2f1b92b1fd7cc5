"""insightface-style MobileFaceNet ("mbf", "mbf_large"): depthwise-separable blocks, GDC embedding head.

Module names follow arcface_torch's mobilefacenet (`layers.N`, `conv_sep`, `features.layers.*`), so its
`mbf` / `mbf_large` checkpoints load with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch
from torch import nn

from facescale.config.schema import ModelConfig
from facescale.models.layers import norm1d, norm2d
from facescale.models.registry import register_backbone

SEPARABLE_CHANNELS = 512  # width of the 1x1 conv before the global depthwise conv


class ConvBlock(nn.Module):
    """`layers` = conv (no bias) + norm, then a per-channel PReLU when `activation` (else a linear block)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, groups: int, norm: str,
                 activation: bool = True) -> None:
        super().__init__()
        modules: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=1 if kernel == 3 else 0,
                      groups=groups, bias=False),
            norm2d(out_channels, norm),
        ]
        if activation:
            modules.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden`, 3x3 depthwise (stride), linear 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool,
                 norm: str) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual DepthWise block needs stride 1 and equal in/out channels")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden, 1, 1, 1, norm),
            ConvBlock(hidden, hidden, 3, stride, hidden, norm),
            ConvBlock(hidden, out_channels, 1, 1, 1, norm, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """`count` residual DepthWise blocks at constant width and resolution."""

    def __init__(self, channels: int, hidden: int, count: int, norm: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, hidden, 1, True, norm)
                                      for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv + norm, flatten, (dropout,) bias-free Linear, BatchNorm1d: the embedding."""

    def __init__(self, embedding_size: int, dropout: float, norm: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(SEPARABLE_CHANNELS, SEPARABLE_CHANNELS, 7, 1, SEPARABLE_CHANNELS, norm, False),
            nn.Flatten(),
            nn.Linear(SEPARABLE_CHANNELS, embedding_size, bias=False),
            norm1d(embedding_size, norm),
        )
        self.dropout = nn.Dropout(p=dropout)  # no parameters: the state dict stays arcface_torch's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gdc, flatten, linear, bn = self.layers
        return bn(linear(self.dropout(flatten(gdc(x)))))


class MobileFaceNet(nn.Module):
    """112 -> 56 -> 28 -> 14 -> 7 with depthwise blocks, then a 7x7 global depthwise conv (GDC) head."""

    def __init__(self, embedding_size: int = 512, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 scale: int = 2, dropout: float = 0.0, norm: str = "batch") -> None:
        super().__init__()
        narrow, wide = 64 * scale, 128 * scale
        if blocks[0] == 1:
            # a single grouped 3x3 (64 groups) as in insightface, instead of a residual stage
            stem_refine: nn.Module = ConvBlock(narrow, narrow, 3, 1, 64, norm)
        else:
            stem_refine = Residual(narrow, 128, blocks[0], norm)
        self.layers = nn.Sequential(
            ConvBlock(3, narrow, 3, 2, 1, norm),
            stem_refine,
            DepthWise(narrow, narrow, 128, 2, False, norm),
            Residual(narrow, 128, blocks[1], norm),
            DepthWise(narrow, wide, 256, 2, False, norm),
            Residual(wide, 256, blocks[2], norm),
            DepthWise(wide, wide, 512, 2, False, norm),
            Residual(wide, 256, blocks[3], norm),
        )
        self.conv_sep = ConvBlock(wide, SEPARABLE_CHANNELS, 1, 1, 1, norm)
        self.features = GDC(embedding_size, dropout, norm)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv_sep(self.layers(images)))


@register_backbone("mbf")
def mobilefacenet(cfg: ModelConfig) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch's "mbf" (blocks 1-4-6-2, width x2), ≈2.0M parameters at 512-d."""
    return MobileFaceNet(cfg.embedding_size, (1, 4, 6, 2), 2, cfg.dropout, cfg.norm)


@register_backbone("mbf_large")
def mobilefacenet_large(cfg: ModelConfig) -> MobileFaceNet:
    """arcface_torch's "mbf_large" (blocks 2-8-12-4, width x4)."""
    return MobileFaceNet(cfg.embedding_size, (2, 8, 12, 4), 4, cfg.dropout, cfg.norm)
