"""insightface-shaped IResNet (r18 … r200): 112x112 face crops -> `embedding_size`-d embeddings.

Module names follow arcface_torch's iresnet so its checkpoints load with `load_state_dict`.
"""

from __future__ import annotations

import torch
from torch import nn

from facescale.config.schema import ModelConfig
from facescale.models.layers import embedding_norm, norm2d
from facescale.models.registry import register_backbone

STAGE_WIDTHS = (64, 128, 256, 512)
OUTPUT_GRID = 7  # 112 / 2**4: each of the four stages halves the resolution


class IBasicBlock(nn.Module):
    """Residual block BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus a 1x1 projection when shapes change."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = norm2d(in_channels, norm)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(channels, norm)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = norm2d(channels, norm)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), norm2d(channels, norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return branch + shortcut


class IResNet(nn.Module):
    """Stem conv3x3(64)-BN-PReLU, four stride-2 stages of IBasicBlocks, then BN2d-dropout-FC-BN1d."""

    def __init__(self, blocks_per_stage: tuple[int, int, int, int], embedding_size: int = 512,
                 dropout: float = 0.0, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm2d(STAGE_WIDTHS[0], norm)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        stages = []
        for channels, count in zip(STAGE_WIDTHS, blocks_per_stage, strict=True):
            blocks = [IBasicBlock(in_channels, channels, 2, norm)]
            blocks += [IBasicBlock(channels, channels, 1, norm) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = norm2d(in_channels, norm)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * OUTPUT_GRID * OUTPUT_GRID, embedding_size)
        self.features = embedding_norm(embedding_size, norm)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface draws every conv from N(0, 0.1) and starts all norms at identity
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x)).flatten(1)
        return self.features(self.fc(x))


def _iresnet(blocks_per_stage: tuple[int, int, int, int], cfg: ModelConfig) -> IResNet:
    return IResNet(blocks_per_stage, cfg.embedding_size, cfg.dropout, cfg.norm)


@register_backbone("r18")
def iresnet18(cfg: ModelConfig) -> IResNet:
    """IResNet-18 (blocks 2-2-2-2), ≈24.0M parameters at 512-d."""
    return _iresnet((2, 2, 2, 2), cfg)


@register_backbone("r34")
def iresnet34(cfg: ModelConfig) -> IResNet:
    """IResNet-34 (blocks 3-4-6-3), ≈34.1M parameters at 512-d."""
    return _iresnet((3, 4, 6, 3), cfg)


@register_backbone("r50")
def iresnet50(cfg: ModelConfig) -> IResNet:
    """IResNet-50 (blocks 3-4-14-3), ≈43.6M parameters at 512-d; the usual arcface_torch baseline."""
    return _iresnet((3, 4, 14, 3), cfg)


@register_backbone("r100")
def iresnet100(cfg: ModelConfig) -> IResNet:
    """IResNet-100 (blocks 3-13-30-3), ≈65.2M parameters at 512-d."""
    return _iresnet((3, 13, 30, 3), cfg)


@register_backbone("r200")
def iresnet200(cfg: ModelConfig) -> IResNet:
    """IResNet-200 (blocks 6-26-60-6), ≈118.8M parameters at 512-d."""
    return _iresnet((6, 26, 60, 6), cfg)
