"""Outside load on a shared CPU, read before and after a benchmark, and a wait for quiet minutes.

The 2-vCPU VMs the CPU benchmarks run on share their cores with other tenants. A burst of load inflates the
GEMM floor and the step unevenly (the step's memory work and many short calls suffer more), so a run's
ratios are only comparable when the machine was quiet. The probe is one fixed GEMM (fp32 [128, 512] x
[512, 10240] in 1024-column blocks, the shape of the head's forward at B = 128, C' = 10k); its median time
is the load reading that `benchmarks/head.py` records before and after a grid (`--wait-quiet` starts the
grid only after two readings in a row at or below a threshold).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PROBE_SHAPE = (128, 512, 10240)  # rows of x, D, columns (center rows)
_PROBE_BLOCK = 1024


def probe_ms(threads: int, repeats: int = 40, shape: tuple[int, int, int] = PROBE_SHAPE) -> float:
    """Median milliseconds of the probe GEMM on `threads` torch threads (torch's count is restored after)."""
    rows, dim, cols = shape
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, dim, generator=gen), torch.randn(cols, dim, generator=gen)
    out = torch.empty(rows, cols)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeats + 2):  # the first two warm the library and the pages
            started = time.perf_counter()
            for lo in range(0, cols, _PROBE_BLOCK):
                torch.mm(x, w[lo : lo + _PROBE_BLOCK].t(), out=out[:, lo : lo + _PROBE_BLOCK])
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times[2:])
    finally:
        torch.set_num_threads(before)


def wait_until_quiet(
    below_ms: float,
    timeout_s: float,
    probe: Callable[[], float],
    interval_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Probe every `interval_s` until two readings in a row are <= `below_ms`, or `timeout_s` has passed.

    Returns {"quiet": bool, "readings_ms": [...], "waited_s": float}; the caller decides what a timeout
    means."""
    started = clock()
    readings: list[float] = []
    while True:
        readings.append(round(probe(), 3))
        if len(readings) >= 2 and max(readings[-2:]) <= below_ms:
            return {"quiet": True, "readings_ms": readings, "waited_s": round(clock() - started, 1)}
        if clock() - started + interval_s > timeout_s:
            return {"quiet": False, "readings_ms": readings, "waited_s": round(clock() - started, 1)}
        sleep(interval_s)
