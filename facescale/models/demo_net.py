"""Small CPU-friendly backbones ("demo", "demo_wide") for the laptop demo and the test suite.

Two stride-2 convs take 112 -> 28 at once, then one residual block per 28/14/7 stage and the insightface-style
BN-dropout-FC-BN1d head. ReLU rather than PReLU and channels_last inside: PReLU's backward is the single
slowest op on one CPU thread. Measured fwd+bwd, batch 64, fp32, 1 thread: demo ≈ 430 img/s, demo_wide ≈ 300.
"""

from __future__ import annotations

import torch
from torch import nn

from facescale.config.schema import ModelConfig
from facescale.models.layers import embedding_norm, norm2d
from facescale.models.registry import register_backbone

OUTPUT_GRID = 7  # 112 / 16


def conv_norm_relu(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    """3x3 conv (no bias) + norm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        norm2d(out_channels, norm),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """conv3x3(stride)-norm-ReLU-conv3x3-norm plus the (1x1-projected if reshaped) input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_norm_relu(in_channels, out_channels, stride, norm),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm2d(out_channels, norm),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm2d(out_channels, norm)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class DemoNet(nn.Module):
    """Stem 112 -> 56 -> 28, residual stages at 28/14/7 of `widths`, then BN2d-dropout-FC-BN1d."""

    def __init__(self, widths: tuple[int, int, int], embedding_size: int = 512, dropout: float = 0.0,
                 norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_norm_relu(3, widths[0] // 2, 2, norm), conv_norm_relu(widths[0] // 2, widths[0], 2, norm)
        )
        self.stages = nn.Sequential(
            ResidualBlock(widths[0], widths[0], 1, norm),
            ResidualBlock(widths[0], widths[1], 2, norm),
            ResidualBlock(widths[1], widths[2], 2, norm),
        )
        self.bn = norm2d(widths[2], norm)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[2] * OUTPUT_GRID * OUTPUT_GRID, embedding_size)
        self.features = embedding_norm(embedding_size, norm)
        self._init_weights()
        # Weights stay contiguous: DeepSpeed broadcasts and flattens parameters as plain buffers. Only the
        # activations go channels_last (oneDNN/cuDNN pick the NHWC kernels from the input's layout).

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for block in self.stages:
            # each residual branch starts as zero, so every block starts as (projected) identity
            nn.init.zeros_(block.body[-1].weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images.contiguous(memory_format=torch.channels_last)))
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))


@register_backbone("demo")
def demo(cfg: ModelConfig) -> DemoNet:
    """Widths 24/48/96 (≈2.6M parameters at 512-d): the default for CPU demos and tests."""
    return DemoNet((24, 48, 96), cfg.embedding_size, cfg.dropout, cfg.norm)


@register_backbone("demo_wide")
def demo_wide(cfg: ModelConfig) -> DemoNet:
    """Widths 32/64/128 (≈3.5M parameters at 512-d): a little more capacity, ~30% slower on CPU."""
    return DemoNet((32, 64, 128), cfg.embedding_size, cfg.dropout, cfg.norm)
