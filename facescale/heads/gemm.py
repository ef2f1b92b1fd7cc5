"""The head's matrix products, fp32 ones on the CPU through oneDNN where torch ships it.

torch.mm hands fp32 to MKL, whose sgemm takes its AVX2 code on AMD CPUs: on a 2-vCPU AMD EPYC (Zen 5) VM it
ran the head's products ([128, 512] x [512, 10k] and the two backward ones) at 125-200 GFLOP/s, where
oneDNN's AVX-512 kernels, which torch ships as `mkldnn._linear_pointwise` (the op torch.compile's CPU backend
emits for linear layers), ran them at 370-450 in plain fp32 (no reduced-precision accumulation); bf16
products already reach oneDNN inside torch.mm. Where the op is missing or fails a self-check at first use,
products stay on torch.mm; FACESCALE_CPU_FP32_GEMM=torch forces that (e.g. to compare the two).

oneDNN returns each product as a fresh tensor; heads/heap.py has glibc serve them again from its heap
(without it the optimizer's 4 MB blocks were paged in afresh every step).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from facescale.heads.heap import KEEP_FREED_BYTES, keep_step_buffers_in_heap

ENV = "FACESCALE_CPU_FP32_GEMM"
BACKENDS = ("onednn", "torch")


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
    also tunes glibc for its fresh products (heads/heap.py)."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in BACKENDS:
        raise ValueError(f"{ENV}={wanted!r}: use one of {', '.join(BACKENDS)} (or leave it unset)")
    available = _onednn_linear() is not None
    if wanted == "onednn" and not available:
        raise ValueError(f"{ENV}=onednn but this torch has no working mkldnn._linear_pointwise; unset it")
    backend = wanted or ("onednn" if available else "torch")
    if backend == "onednn":
        keep_step_buffers_in_heap()  # once, with the choice, not per product
    return backend


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
    return _on_onednn(a, b) and rows * cols * a.element_size() <= KEEP_FREED_BYTES


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """a @ b for a [M, K] and b [K, N] (views welcome), written into `out` if given; `scratch`, a [M, N]
    buffer the product may go to (torch.mm writes it; oneDNN returns a fresh tensor, not copied there)."""
    if _on_onednn(a, b):
        product = _onednn_linear()(a, b.t(), None, "none", [], "")
        return product if out is None else out.copy_(product)
    out = out if out is not None else scratch
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
