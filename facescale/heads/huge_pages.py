"""Class-center storage on the CPU backed by transparent huge pages where Linux offers them.

The optimizer and the forward's gather touch a few thousand scattered 1-2 KB rows of a shard that spans
hundreds of MB: with 4 KB pages nearly every row costs a TLB miss, which dominates the row's time. Advising
the shard's memory as huge before its first touch (MADV_HUGEPAGE; honoured when
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`) made the row gather 5-9% and the
scattered update 3-16% faster at C = 100k, with the kernels prefetching rows ahead (they hide much of the
miss; benchmarks/results/head_parts_cpu.md). Elsewhere, or when the call fails, the tensor is an ordinary one.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache

import torch
from torch import Tensor

HUGE_PAGE_BYTES = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14  # linux/mman.h


@lru_cache(maxsize=1)
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def advise_huge_pages(tensor: Tensor) -> bool:
    """Ask for huge pages under the 2 MB-aligned interior of a CPU tensor's memory (only pages not yet
    touched get them); True if the kernel accepted the advice."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = stop // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return last > first and madvise(first, last - first, _MADV_HUGEPAGE) == 0


def empty_rows(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """torch.empty for a shard-sized buffer, on the CPU advised to huge pages before anything touches it."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.numel() * tensor.element_size() >= 2 * HUGE_PAGE_BYTES:
        advise_huge_pages(tensor)
    return tensor


def zeros_rows(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None
) -> Tensor:
    """torch.zeros, through `empty_rows`."""
    return empty_rows(shape, dtype, device).zero_()
