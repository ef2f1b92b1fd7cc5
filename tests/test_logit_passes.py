"""The native passes over the head's logits buffer (heads/kernels/logit_passes.cpp) against torch and float64:
exp within 2 ulp, row max without the target column, and the in-place bf16 widening / narrowing, which run in
waves over all threads, bit-identical to torch at every thread count."""

from __future__ import annotations

import pytest
import torch

from facescale.heads.native import center_kernels

pytestmark = pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the native passes are off")


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """Run with this many threads (the passes split rows or waves over torch's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_exp_row_sums_match_float64_within_two_ulp(threads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(9, 3001, generator=gen) * -95.0  # down past exp's normal range (-87.3)
    x[:, :7] = torch.tensor([0.0, -1e-8, -0.3465, -0.3467, -87.0, -87.3, -88.0])
    x[4, 100] = float("nan")
    shift = torch.rand(9, generator=gen) - 0.5
    got, sums = x.clone(), torch.empty(9)
    center_kernels().exp_row_sums_(got, shift, sums)
    exact = torch.exp((x - shift[:, None]).double())  # the kernel's own fp32 difference, exp in float64
    normal = exact >= torch.finfo(torch.float32).tiny
    ulp = torch.finfo(torch.float32).eps
    assert ((got.double() - exact).abs() <= 2 * ulp * exact)[normal].all()
    assert (got[~normal & ~exact.isnan()] <= torch.finfo(torch.float32).tiny).all()  # flushed: 0 or tiny
    assert got[4, 100].isnan() and sums[4].isnan()
    keep = torch.arange(9) != 4
    torch.testing.assert_close(sums[keep].double(), exact[keep].sum(dim=1), rtol=1e-6, atol=0)


def test_scale_row_max_leaves_the_target_column_out() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 37, generator=gen)
    skip = torch.tensor([-1, 0, 36, 5, 17, 20])
    x[torch.arange(6), skip.clamp_min(0)] = 50.0  # the skipped column holds the row's largest value
    x[5, 3] = float("nan")
    got, row_max = x.clone(), torch.empty(6)
    center_kernels().scale_row_max_(got, 64.0, skip, row_max)
    torch.testing.assert_close(got, x * 64.0, rtol=0, atol=0, equal_nan=True)  # the skipped column too
    for r in range(5):
        keep = torch.ones(37, dtype=torch.bool)
        if skip[r] >= 0:
            keep[skip[r]] = False
        assert row_max[r] == (x[r] * 64.0)[keep].max()
    assert row_max[5].isnan()
    single, single_max = torch.tensor([[0.25]]), torch.empty(1)
    center_kernels().scale_row_max_(single, 2.0, torch.tensor([0]), single_max)
    assert single_max[0] == float("-inf") and single[0, 0] == 0.5  # nothing left: -inf; value still scaled


@pytest.mark.parametrize("shape", [(3, 5), (64, 3001), (512, 700)])  # 15 to 358k elements: 0 to 7 waves
def test_in_place_bf16_widening_and_narrowing_equal_torch(shape: tuple[int, int], threads: int) -> None:
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows)
    x_hat = torch.randn(rows, 64, generator=gen).bfloat16()
    weight = torch.randn(cols, 64, generator=gen).bfloat16()
    scale = torch.rand(cols, generator=gen) * 0.3  # some cosines land beyond +-1 and are clamped
    expected = (torch.mm(x_hat, weight.t()).float() * scale).clamp(-1.0, 1.0)
    got = center_kernels().bf16_cosines_in_place(x_hat, weight, scale, torch.full((rows, cols), 7.0))
    assert torch.equal(got, expected)

    grad = torch.randn(rows, cols, generator=gen)
    half = center_kernels().scaled_bf16_in_place(grad.clone(), scale)
    assert half.dtype == torch.bfloat16 and torch.equal(half, (grad * scale).bfloat16())

    cos = torch.randn(rows, cols, generator=gen)
    assert torch.equal(center_kernels().scale_clamp_(cos.clone(), scale), (cos * scale).clamp(-1.0, 1.0))
