"""Normalisation and regularisation layers shared by the backbones, switched by `model.norm`."""

from __future__ import annotations

import math

import torch
from torch import nn

GROUP_NORM_MAX_GROUPS = 32


def norm2d(channels: int, norm: str) -> nn.Module:
    """BatchNorm2d for norm="batch"; for norm="group" a GroupNorm that never mixes samples of a batch."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5)
    if norm == "group":
        return nn.GroupNorm(math.gcd(GROUP_NORM_MAX_GROUPS, channels), channels, eps=1e-5)
    raise ValueError(f"model.norm: '{norm}' is not one of batch, group")


def norm1d(features: int, norm: str, eps: float = 1e-5) -> nn.Module:
    """BatchNorm1d over embeddings for norm="batch"; LayerNorm (batch-independent) for norm="group"."""
    if norm == "batch":
        return nn.BatchNorm1d(features, eps=eps)
    if norm == "group":
        return nn.LayerNorm(features, eps=eps)
    raise ValueError(f"model.norm: '{norm}' is not one of batch, group")


def embedding_norm(features: int, norm: str) -> nn.Module:
    """The last layer of the insightface-style backbones: a norm whose scale is frozen at 1, shift learnt.

    insightface's arcface_torch sets `features.weight = 1` with requires_grad=False; we keep that (and the
    state-dict layout), so the embedding is standardised per dimension and only its offset is trained.
    """
    layer = norm1d(features, norm)
    nn.init.ones_(layer.weight)
    layer.weight.requires_grad_(False)
    return layer


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability `rate`."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
