"""The head's matrix products, fp32 ones on the CPU through oneDNN where torch ships it.

torch.mm hands fp32 to MKL, whose sgemm takes its AVX2 code on AMD CPUs: on a 2-vCPU AMD EPYC (Zen 5) VM it
ran the head's products ([128, 512] x [512, 10k] and the two backward ones) at 125-200 GFLOP/s, where
oneDNN's AVX-512 kernels, which torch ships as `mkldnn._linear_pointwise` (the op torch.compile's CPU backend
emits for linear layers), ran them at 370-450 in plain fp32 (no reduced-precision accumulation); bf16
products already reach oneDNN inside torch.mm. Where the op is missing or fails a self-check at first use,
products stay on torch.mm; FACESCALE_CPU_FP32_GEMM=torch forces that (e.g. to compare the two).

oneDNN returns each product as a fresh tensor. With glibc's default malloc tuning the optimizer's 4 MB
blocks were mapped and paged in afresh every step (2.3k page faults a step at B = 128, C' = 10k; 14.5k at
B = 512, C' = 30k; ~1 ms per 4 MB block), so where oneDNN runs, allocations below 64 MiB come from the heap
and up to 16 MiB of freed heap is kept for reuse (glibc's mallopt; skipped when MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ is set, i.e. when the user tuned malloc already).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

ENV = "FACESCALE_CPU_FP32_GEMM"
BACKENDS = ("onednn", "torch")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_ABOVE, _KEEP_FREED = 64 * 2**20, 16 * 2**20
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def _onednn_linear() -> Callable[..., Tensor] | None:
    """torch's oneDNN linear (x @ w.t()), or None if this torch lacks it or it gets a small product wrong."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        a, w = torch.randn(5, 33, generator=gen), torch.randn(7, 33, generator=gen)
        got = op(a, w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    want = a.double() @ w.double().t()
    return op if torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5) else None


@functools.cache
def fp32_backend() -> str:
    """"onednn" or "torch": what runs fp32 CPU products in this process (FACESCALE_CPU_FP32_GEMM may ask for
    torch; asking for onednn where it is unavailable is an error, not a silent fallback). Choosing oneDNN
    also tunes glibc for its fresh products (keep_products_in_heap)."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in BACKENDS:
        raise ValueError(f"{ENV}={wanted!r}: use one of {', '.join(BACKENDS)} (or leave it unset)")
    available = _onednn_linear() is not None
    if wanted == "onednn" and not available:
        raise ValueError(f"{ENV}=onednn but this torch has no working mkldnn._linear_pointwise; unset it")
    backend = wanted or ("onednn" if available else "torch")
    if backend == "onednn":
        keep_products_in_heap()  # once, with the choice, not per product (module doc)
    return backend


@functools.cache
def keep_products_in_heap() -> bool:
    """Have glibc serve allocations below 64 MiB from its heap and keep 16 MiB of freed heap (module doc);
    True if it took both settings (False off Linux/glibc or when the user's MALLOC_* environment set them)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED))


def _on_onednn(a: Tensor, b: Tensor) -> bool:
    return (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.numel() > 0
        and b.numel() > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))  # the op has no autograd
        and fp32_backend() == "onednn"
    )


def fresh_product(rows: int, cols: int, a: Tensor, b: Tensor) -> bool:
    """True when a [rows, cols] product of a and b (operands as matmul takes them) comes back from oneDNN as a
    fresh tensor the heap serves again without page faults (no larger than the freed heap glibc keeps): a
    buffer kept for it would sit unused."""
    return _on_onednn(a, b) and rows * cols * a.element_size() <= _KEEP_FREED


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """a @ b for a [M, K] and b [K, N] (views welcome), written into `out` if given; `scratch`, a [M, N]
    buffer the product may go to (torch.mm writes it; oneDNN returns a fresh tensor, not copied there)."""
    if _on_onednn(a, b):
        product = _onednn_linear()(a, b.t(), None, "none", [], "")
        return product if out is None else out.copy_(product)
    out = out if out is not None else scratch
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
