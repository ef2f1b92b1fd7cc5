"""heads/gemm.py: the head's products equal float64 ones on either backend; the backend choice is honest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from facescale.heads import gemm, heap


def _operands(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m * 31 + n)
    return torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)


@pytest.mark.parametrize("choice", [None, "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "column slice"])
def test_product_matches_float64(backend, choice: str | None, layout: str) -> None:
    backend(choice)
    a, b = _operands(96, 300, 1200)
    if layout == "transposed":  # the head's d-centers product: (G*r).t() @ x-hat, both views
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    elif layout == "column slice":  # a block of columns of a wider buffer, as the optimizer reads it
        wide = torch.randn(96, 500)
        wide[:, 100:400] = a.t().contiguous().t()[:, :300]
        a = wide[:, 100:400]
    want = a.double() @ b.double()
    got = gemm.matmul(a, b)
    assert got.dtype == torch.float32 and got.shape == (96, 1200)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_out_receives_the_product_and_scratch_may(backend) -> None:
    backend(None)
    a, b = _operands(64, 128, 700)
    wide = torch.full((64, 1000), 7.0)
    result = gemm.matmul(a, b, out=wide[:, 200:900])  # into a strided block of a buffer, as cosine_gemm does
    torch.testing.assert_close(wide[:, 200:900].double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)
    assert result.data_ptr() == wide[:, 200:900].data_ptr()
    assert torch.equal(wide[:, :200], torch.full((64, 200), 7.0))  # nothing outside the block is touched
    scratch = torch.empty(64, 700)
    product = gemm.matmul(a, b, scratch=scratch)
    torch.testing.assert_close(product.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)


def test_torch_backend_is_torch_mm_bit_for_bit(backend) -> None:
    backend("torch")
    a, b = _operands(32, 64, 100)
    assert gemm.fp32_backend() == "torch"
    assert torch.equal(gemm.matmul(a, b), torch.mm(a, b))


def test_default_runs_fp32_on_onednn_where_torch_has_it(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch is built without oneDNN")
    backend(None)
    assert gemm.fp32_backend() == "onednn"
    calls = []
    real = gemm._onednn_linear()

    def counting(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(gemm, "_onednn_linear", lambda: counting)
    a, b = _operands(16, 32, 48)
    gemm.matmul(a, b)
    gemm.matmul(a.double(), b.double())  # float64 (reference tests) stays on torch.mm
    gemm.matmul(a.requires_grad_(), b)  # so does anything autograd must see: the op has no derivative
    assert calls == [torch.float32]


def test_unknown_or_unavailable_choice_is_an_error(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend("mkl")
    with pytest.raises(ValueError, match=f"{gemm.ENV}='mkl'.*onednn, torch"):
        gemm.fp32_backend()
    backend("onednn")
    monkeypatch.setattr(gemm, "_onednn_linear", lambda: None)
    with pytest.raises(ValueError, match="no working mkldnn._linear_pointwise"):
        gemm.fp32_backend()


_STEADY_STEP_FAULTS = """
import resource, statistics, sys, torch
from facescale.config.schema import MarginConfig
from facescale.heads.margins import build_margin
from facescale.heads.partial_fc import PartialFCHead
torch.set_num_threads(2)
dtype, batch = getattr(torch, sys.argv[1]), int(sys.argv[2])
head = PartialFCHead(20_000, 512, build_margin(MarginConfig(type="arcface", s=64.0, m2=0.5)), seed=0,
                     sample_rate=0.5, update="sparse", storage_dtype=dtype)
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(batch, 512, generator=gen).to(dtype), torch.randint(0, 20_000, (batch,), generator=gen)
def step(i):
    loss, _ = head(x.clone().requires_grad_(), y, i)
    loss.backward()
    head.optimizer_step(0.1)
for i in range(12):  # every page of the lazily zeroed momentum rows touched (each step samples half the rows)
    step(i)
faults = []
for i in range(12, 32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(i)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tuning is Linux-only")
@pytest.mark.parametrize("dtype, batch", [("float32", 128), ("bfloat16", 512)])
def test_a_steady_head_step_pages_in_no_memory(dtype: str, batch: int) -> None:
    """The step's temporaries are reused from the heap, not mapped anew every step (C' = 10k, glibc's default
    tuning: ~2.3k page faults a step at fp32 B = 128, oneDNN's fresh products; ~900 at bf16 B = 512). The
    median step of 20 counts: under outside load the heap now and then grows by a few MiB in one step (the
    allocation order shifts with the threads' timing), a one-off that is not what this test is about."""
    tuned = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", gemm.ENV)
    env = {k: v for k, v in os.environ.items() if k not in tuned}
    done = subprocess.run(
        [sys.executable, "-c", _STEADY_STEP_FAULTS, dtype, str(batch)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 64, f"{done.stdout.strip()} page faults in the median step"


def test_malloc_tuning_is_left_to_a_user_who_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    heap.keep_step_buffers_in_heap.cache_clear()
    try:
        assert heap.keep_step_buffers_in_heap() is False
    finally:
        heap.keep_step_buffers_in_heap.cache_clear()


def test_fresh_products_are_the_onednn_ones_the_heap_serves(backend) -> None:
    a, b = _operands(8, 16, 8)
    backend("torch")
    assert not gemm.fresh_product(2048, 512, a, b)  # torch.mm writes into a caller's buffer
    if not torch.backends.mkldnn.is_available():
        return
    backend(None)
    assert gemm.fresh_product(2048, 512, a, b)  # 4 MiB
    assert not gemm.fresh_product(512, 10_000, a, b)  # 20 MiB: more than the freed heap glibc keeps
    assert not gemm.fresh_product(2048, 512, a.bfloat16(), b.bfloat16())  # bf16 stays on torch.mm
