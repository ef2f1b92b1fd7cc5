"""Additive/multiplicative angular margins applied to the target cosine only (ArcFace, CosFace, combined).

Each margin maps fp32 target cosines c = cos(theta) to penalised cosines before the scale s; non-target
logits are s*c untouched. `type` in `MarginConfig` picks which of m1/m2/m3 are read:
  arcface                   cos(theta + m2), falling back to c - sin(pi - m2)*m2 where theta + m2 > pi
  cosface                   c - m3
  combined                  cos(m1*theta + m2) - m3; where m1*theta + m2 > pi, the line in c that continues
                            it from -1 - m3 (continuous, still falling as theta grows)
  arcface_straight_through  forward cos(theta + m2) (no fallback), backward identity: insightface's
                            arcface_torch behaviour since Dec 2022, kept as an explicit option.
Gradients are exact except at |c| = 1, where sin(theta) is floored at 1e-6 so they stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from facescale.config.schema import MarginConfig, MarginKind, choices

MARGIN_TYPES = choices(MarginKind)
_SIN_FLOOR_SQ = 1e-12  # floor on 1 - c^2, keeps d sin(theta)/dc finite at c = +-1


def _sin_theta(cos: Tensor) -> Tensor:
    """sin(theta) for theta in [0, pi], computed from cos(theta) with a finite gradient everywhere."""
    return torch.sqrt((1.0 - cos * cos).clamp_min(_SIN_FLOOR_SQ))


class TargetMargin:
    """Base class: `margin(cos_target) -> penalised cos_target`, elementwise, differentiable by autograd."""

    def __call__(self, cos: Tensor) -> Tensor:
        raise NotImplementedError


class ArcFaceMargin(TargetMargin):
    """cos(theta + m) with the classic fallback c - sin(pi - m)*m where theta + m > pi (exact gradient)."""

    def __init__(self, m: float) -> None:
        self.m = m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)  # c > threshold  <=>  theta + m < pi
        self.fallback_shift = math.sin(math.pi - m) * m

    def __call__(self, cos: Tensor) -> Tensor:
        shifted = cos * self.cos_m - _sin_theta(cos) * self.sin_m
        return torch.where(cos > self.threshold, shifted, cos - self.fallback_shift)

    def __repr__(self) -> str:
        return f"ArcFaceMargin(m={self.m})"


class CosFaceMargin(TargetMargin):
    """c - m (large margin cosine loss)."""

    def __init__(self, m: float) -> None:
        self.m = m

    def __call__(self, cos: Tensor) -> Tensor:
        return cos - self.m

    def __repr__(self) -> str:
        return f"CosFaceMargin(m={self.m})"


class CombinedMargin(TargetMargin):
    """cos(m1*theta + m2) - m3 up to the angle where m1*theta + m2 = pi (value -1 - m3, cosine c_pi); beyond
    it c - c_pi - 1 - m3, so the target logit is continuous and non-increasing in theta on [0, pi] for every
    m1 >= 1 (ArcFace's fallback c - sin(m2)*m2 would jump up there once m1 > 1)."""

    def __init__(self, m1: float, m2: float, m3: float) -> None:
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.boundary_cos = math.cos((math.pi - m2) / m1)  # c_pi: the cosine where m1*theta + m2 = pi
        self.fallback_shift = self.boundary_cos + 1.0 + m3

    def __call__(self, cos: Tensor) -> Tensor:
        theta = torch.atan2(_sin_theta(cos), cos)
        angle = self.m1 * theta + self.m2
        return torch.where(angle <= math.pi, torch.cos(angle) - self.m3, cos - self.fallback_shift)

    def __repr__(self) -> str:
        return f"CombinedMargin(m1={self.m1}, m2={self.m2}, m3={self.m3})"


class ArcFaceStraightThroughMargin(TargetMargin):
    """Forward cos(theta + m) without fallback, backward d/dc = 1 (arcface_torch since 2022-12)."""

    def __init__(self, m: float) -> None:
        self.m = m

    def __call__(self, cos: Tensor) -> Tensor:
        with torch.no_grad():
            shifted = torch.cos(torch.acos(cos.clamp(-1.0, 1.0)) + self.m)
        return cos + (shifted - cos.detach())

    def __repr__(self) -> str:
        return f"ArcFaceStraightThroughMargin(m={self.m})"


@dataclass(frozen=True)
class MarginSoftmaxSpec:
    """Everything the margin softmax needs: target margin, scale s, inter-class filter threshold (0 = off)."""

    target_margin: TargetMargin
    scale: float
    filter_threshold: float = 0.0


def _require(ok: bool, key: str, value: float, rule: str) -> None:
    if not ok:
        raise ValueError(f"head.margin.{key} = {value!r} is invalid: {rule}")


def build_margin(cfg: MarginConfig) -> MarginSoftmaxSpec:
    """Validate a `MarginConfig` and turn it into the margin used by the distributed cross-entropy."""
    _require(cfg.type in MARGIN_TYPES, "type", cfg.type, f"choose one of {', '.join(MARGIN_TYPES)}")
    _require(cfg.s > 0, "s", cfg.s, "the logit scale must be > 0 (64 is usual)")
    t = cfg.interclass_filtering_threshold
    _require(
        0.0 <= t < 1.0, "interclass_filtering_threshold", t, "use 0 (off) or a cosine in (0, 1), e.g. 0.4"
    )
    if cfg.type in ("arcface", "arcface_straight_through"):
        _require(
            0.0 <= cfg.m2 < math.pi / 2,
            "m2",
            cfg.m2,
            f"{cfg.type} reads m2 as the angle margin, in [0, pi/2)",
        )
        margin: TargetMargin = (
            ArcFaceMargin(cfg.m2) if cfg.type == "arcface" else ArcFaceStraightThroughMargin(cfg.m2)
        )
    elif cfg.type == "cosface":
        _require(cfg.m3 >= 0.0, "m3", cfg.m3, "cosface reads m3 as the cosine margin, >= 0 (e.g. 0.4)")
        margin = CosFaceMargin(cfg.m3)
    else:
        _require(cfg.m1 >= 1.0, "m1", cfg.m1, "combined reads m1 as the multiplicative angle margin, >= 1")
        _require(
            0.0 <= cfg.m2 < math.pi / 2, "m2", cfg.m2, "combined reads m2 as the angle margin, in [0, pi/2)"
        )
        _require(cfg.m3 >= 0.0, "m3", cfg.m3, "combined reads m3 as the cosine margin, >= 0")
        margin = CombinedMargin(cfg.m1, cfg.m2, cfg.m3)
    return MarginSoftmaxSpec(target_margin=margin, scale=float(cfg.s), filter_threshold=float(t))
