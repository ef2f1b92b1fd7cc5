"""Margins on the target cosine: values against closed forms, float64 gradchecks, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from facescale.config.schema import MarginConfig
from facescale.heads.margins import (
    ArcFaceMargin,
    ArcFaceStraightThroughMargin,
    CombinedMargin,
    CosFaceMargin,
    build_margin,
)


def _cosines(*, low: float = -0.97, high: float = 0.97, n: int = 41) -> torch.Tensor:
    return torch.linspace(low, high, n, dtype=torch.float64)


def _reference_combined(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1*theta + m2) - m3 where it is defined (m1*theta + m2 <= pi), NaN beyond (checked apart)."""
    theta = torch.acos(cos)
    angle = m1 * theta + m2
    return torch.where(angle <= math.pi, torch.cos(angle) - m3, torch.nan)


def _defined(cos: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    return m1 * torch.acos(cos) + m2 <= math.pi


def test_arcface_is_cos_theta_plus_m_with_the_classic_fallback() -> None:
    m = 0.5
    cos = _cosines(low=-0.999, high=0.999, n=201)
    theta = torch.acos(cos)
    expected = torch.where(theta + m <= math.pi, torch.cos(theta + m), cos - math.sin(math.pi - m) * m)
    torch.testing.assert_close(ArcFaceMargin(m)(cos), expected, rtol=0, atol=1e-9)
    assert bool((theta + m > math.pi).any()) and bool((theta + m < math.pi).any())  # both branches hit


def test_cosface_and_combined_special_cases() -> None:
    cos = _cosines(low=-0.999, high=0.999, n=201)
    torch.testing.assert_close(CosFaceMargin(0.4)(cos), cos - 0.4)
    arc = _defined(cos, 1.0, 0.5)  # the two agree where cos(theta + m2) is defined; fallbacks differ
    torch.testing.assert_close(CombinedMargin(1.0, 0.5, 0.0)(cos)[arc], ArcFaceMargin(0.5)(cos)[arc], rtol=0,
                               atol=1e-9)
    torch.testing.assert_close(CombinedMargin(1.0, 0.0, 0.4)(cos), cos - 0.4, rtol=0, atol=1e-9)
    for m1, m2, m3 in [(2.0, 0.0, 0.0), (1.35, 0.25, 0.1), (4.0, 0.3, 0.2)]:  # m1 really multiplies theta
        got, ok = CombinedMargin(m1, m2, m3)(cos), _defined(cos, m1, m2)
        torch.testing.assert_close(got[ok], _reference_combined(cos, m1, m2, m3)[ok], rtol=0, atol=1e-9)


@pytest.mark.parametrize("m1", [1.0, 1.2, 1.35, 2.0, 4.0])
@pytest.mark.parametrize("m2", [0.0, 0.1, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("m3", [0.0, 0.1, 0.35])
def test_combined_target_logit_is_continuous_and_non_increasing_in_theta(m1, m2, m3) -> None:
    """On a fine theta grid over [0, pi] (float64): never rises, and never moves by more than its
    Lipschitz bound max(m1, 1) x step (a jump would); equal to cos(m1*theta + m2) - m3 where defined."""
    theta = torch.linspace(0.0, math.pi, 200_001, dtype=torch.float64)
    value = CombinedMargin(m1, m2, m3)(torch.cos(theta))
    steps = value[1:] - value[:-1]
    assert float(steps.max()) <= 1e-12, f"rises by {float(steps.max()):.3g} at {float(theta[steps.argmax()])}"
    bound = max(m1, 1.0) * float(theta[1] - theta[0]) * 1.001 + 1e-9
    assert float(steps.abs().max()) <= bound, f"jumps by {float(steps.abs().max()):.3g}"
    # sin(theta) is floored at 1e-6 (finite gradients at |c| = 1), which moves theta within 1e-6 of 0 and pi
    defined = (m1 * theta + m2 <= math.pi) & (theta > 1e-3) & (theta < math.pi - 1e-3)
    torch.testing.assert_close(value[defined], torch.cos(m1 * theta[defined] + m2) - m3, rtol=0, atol=1e-9)


def test_combined_margin_at_the_reported_boundary_no_longer_jumps_up() -> None:
    """m = (1.35, 0.5, 0.1): the old fallback went from -1.100 to -0.716 across m1*theta + m2 = pi."""
    edge = (math.pi - 0.5) / 1.35
    before, after = torch.cos(torch.tensor([edge - 1e-6, edge + 1e-6], dtype=torch.float64))
    got = CombinedMargin(1.35, 0.5, 0.1)(torch.stack([before, after]))
    assert abs(float(got[0]) + 1.1) < 1e-6 and float(got[1]) <= float(got[0])


def test_straight_through_forward_is_arcface_backward_is_identity() -> None:
    cos = _cosines(low=-0.5, high=0.999).requires_grad_()
    out = ArcFaceStraightThroughMargin(0.5)(cos)
    torch.testing.assert_close(out.detach(), torch.cos(torch.acos(cos.detach()) + 0.5))
    out.sum().backward()
    torch.testing.assert_close(cos.grad, torch.ones_like(cos))


@pytest.mark.parametrize(
    "margin",
    [
        ArcFaceMargin(0.5),
        ArcFaceMargin(0.2),
        CosFaceMargin(0.35),
        CombinedMargin(1.0, 0.5, 0.0),
        CombinedMargin(1.35, 0.25, 0.1),
        CombinedMargin(2.0, 0.0, 0.3),
    ],
    ids=repr,
)
def test_float64_gradcheck_away_from_kinks(margin) -> None:
    # the straight-through margin's gradient is identity by definition, checked in its own test
    cos = _cosines(n=37)
    if isinstance(margin, ArcFaceMargin | CombinedMargin):  # keep clear of the branch switch (a kink)
        m1 = getattr(margin, "m1", 1.0)
        m2 = getattr(margin, "m2", getattr(margin, "m", 0.0))
        kink = math.cos((math.pi - m2) / m1)
        cos = cos[(cos - kink).abs() > 1e-3]
    assert torch.autograd.gradcheck(margin, (cos.clone().requires_grad_(),))


def test_gradients_stay_finite_at_plus_minus_one() -> None:
    for margin in (ArcFaceMargin(0.5), CombinedMargin(1.2, 0.3, 0.1)):
        cos = torch.tensor([-1.0, 1.0], dtype=torch.float32, requires_grad=True)
        margin(cos).sum().backward()
        assert torch.isfinite(cos.grad).all(), margin


def test_build_margin_reads_the_fields_its_type_names() -> None:
    spec = build_margin(MarginConfig(type="cosface", s=30.0, m3=0.4, interclass_filtering_threshold=0.4))
    assert isinstance(spec.target_margin, CosFaceMargin) and spec.target_margin.m == 0.4
    assert spec.scale == 30.0 and spec.filter_threshold == 0.4
    assert isinstance(build_margin(MarginConfig()).target_margin, ArcFaceMargin)
    combined = build_margin(MarginConfig(type="combined", m1=1.35, m2=0.25, m3=0.1)).target_margin
    assert (combined.m1, combined.m2, combined.m3) == (1.35, 0.25, 0.1)
    straight = build_margin(MarginConfig(type="arcface_straight_through", m2=0.4)).target_margin
    assert isinstance(straight, ArcFaceStraightThroughMargin) and straight.m == 0.4


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"type": "sphereface"}, "head.margin.type"),
        ({"s": 0.0}, "head.margin.s"),
        ({"m2": 2.0}, "head.margin.m2"),
        ({"type": "cosface", "m3": -0.1}, "head.margin.m3"),
        ({"type": "combined", "m1": 0.5}, "head.margin.m1"),
        ({"interclass_filtering_threshold": 1.5}, "head.margin.interclass_filtering_threshold"),
    ],
)
def test_build_margin_names_the_bad_key(changes: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_margin(MarginConfig(**changes))
