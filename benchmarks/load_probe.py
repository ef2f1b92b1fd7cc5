"""Outside load on a shared CPU, read around each benchmark case, and waiting for quiet minutes.

The 2-vCPU VMs the CPU benchmarks run on share their cores with other tenants. A burst of load inflates the
GEMM floor and the step unevenly (the step's memory work and many short calls suffer more), so a case's
ratios are only comparable when the machine was quiet. The probe is one fixed GEMM (fp32 [128, 512] x
[512, 10240] in 1024-column blocks, the shape of the head's forward at B = 128, C' = 10k); its median time
is the load reading `benchmarks/head.py` takes before and after every case. With a threshold (`QuietGate`)
a case starts only after two readings in a row at or below it, and runs again when the reading after it
is above it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
        return round(statistics.median(times[2:]), 3)
    finally:
        torch.set_num_threads(before)


class QuietGate:
    """Waits, within one time budget for a whole grid, for two probe readings in a row <= `below_ms`.

    Readings follow each other at once while they are quiet and `interval_s` apart while they are not, so
    a quiet machine passes the gate in two probes."""

    def __init__(
        self,
        below_ms: float,
        budget_s: float,
        probe: Callable[[], float],
        interval_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.below_ms, self.probe, self.interval_s = below_ms, probe, interval_s
        self.sleep, self.clock = sleep, clock
        self.deadline = clock() + budget_s
        self.readings: list[float] = []  # every reading taken, in order (for the report)
        self.waited_s = 0.0  # time slept waiting for quiet

    def quiet(self, reading: float) -> bool:
        return reading <= self.below_ms

    def time_left(self) -> bool:
        return self.clock() < self.deadline

    def wait(self) -> tuple[bool, float]:
        """(whether two quiet readings in a row came before the budget ran out, the last reading)."""
        previous_quiet = False
        while True:
            reading = self.probe()
            self.readings.append(reading)
            if self.quiet(reading) and previous_quiet:
                return True, reading
            previous_quiet = self.quiet(reading)
            if not previous_quiet:
                if self.clock() + self.interval_s > self.deadline:
                    return False, reading
                self.sleep(self.interval_s)
                self.waited_s += self.interval_s
