"""glibc's malloc tuned so that the CPU head's per-step temporaries are reused, not paged in afresh each step.

A head step allocates and frees the same 1-16 MB tensors every step: oneDNN's fresh fp32 products (the
optimizer's 4 MB blocks), the [B, D] fp32 copies of bf16 embeddings and their gradients, bf16 products.
With glibc's default, adaptive tuning many of them were mapped and paged in anew every step: 2.3k page
faults a step at fp32 B = 128, C' = 10k (14.5k at B = 512, C' = 30k; ~1 ms per 4 MB), ~900 at bf16
B = 512, C' = 10k (the step ~10% slower). So on the CPU the head has glibc serve allocations below 64 MiB
from its heap and keep 16 MiB of freed heap (mallopt), unless the user tuned malloc already
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set). 16 MiB is the least that left a steady step free of
page faults at B = 128 and 512, C' = 10k and 30k (8 MiB: ~3k faults a step at fp32).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

KEEP_FREED_BYTES = 16 * 2**20  # freed heap glibc keeps: a temporary up to this size is served again
MMAP_ABOVE_BYTES = 64 * 2**20  # larger allocations are mapped (and returned to the OS when freed)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


@functools.cache
def keep_step_buffers_in_heap() -> bool:
    """Apply the tuning above once per process; True if glibc took both settings (False off Linux/glibc or
    when the user's MALLOC_* environment set them)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    )
