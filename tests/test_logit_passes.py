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


def test_bf16_rounding_of_every_kind_of_float_equals_torch() -> None:
    """The kernels' rounding to bf16 (shared by the narrowing pass and the bf16 update and replay) against
    torch's on ties to even, carries into the exponent, overflow to inf, subnormals, signed zeros, infinities
    and 1M random bit patterns; NaN stays NaN (its payload bits are not compared: torch's scalar and vector
    paths disagree there)."""
    special = [
        0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0xBF808000, 0xBF818000,  # ties and their neighbours
        0x3FFF_FFFF, 0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F7F_7FFF,  # carry into the exponent, overflow to +-inf
        0x0000_0001, 0x0000_8000, 0x0001_8000, 0x807F_FFFF, 0x0080_0000,  # subnormals, smallest normal
        0x0000_0000, 0x8000_0000, 0x7F80_0000, 0xFF80_0000,  # zeros and infinities
        0x7F80_0001, 0xFF80_0001, 0x7FC0_0000, 0xFFFF_FFFF, 0x7FFF_8000,  # NaNs, signalling and quiet
    ]
    gen = torch.Generator().manual_seed(11)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    bits = torch.cat([torch.tensor(special, dtype=torch.int64), random_bits])
    x = ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32).reshape(1, -1)
    got = center_kernels().scaled_bf16_in_place(x.clone(), torch.ones(x.shape[1]))
    expected = x.bfloat16()
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_scale_clamp_into_a_column_block_writes_that_block_only(threads: int) -> None:
    """A fresh [N, k] product scaled and clamped into columns [lo, lo + k) of a wider buffer (rows strided):
    those columns equal torch's multiply-then-clamp, NaN stays NaN, every other column is untouched."""
    gen = torch.Generator().manual_seed(11)
    product = torch.randn(37, 300, generator=gen) * 2.0  # some beyond +-1 after scaling
    product[5, 7] = float("nan")
    scale = torch.rand(300, generator=gen) + 0.5
    buffer = torch.full((37, 1000), 7.0)
    center_kernels().scale_clamp_into(product, scale, buffer[:, 400:700])
    expected = (product * scale).clamp(-1.0, 1.0)
    torch.testing.assert_close(buffer[:, 400:700], expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(buffer[5, 407])
    assert (buffer[:, :400] == 7.0).all() and (buffer[:, 700:] == 7.0).all()
    with pytest.raises(ValueError, match="scale_clamp_into needs"):
        center_kernels().scale_clamp_into(product, scale[:299], buffer[:, 400:700])
    with pytest.raises(ValueError, match="scale_clamp_into needs"):
        center_kernels().scale_clamp_into(product.bfloat16(), scale, buffer[:, 400:700])
