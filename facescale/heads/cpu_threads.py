"""The head's CPU thread budget: its many small torch ops run on the calling thread, its big work on all.

A torch op on more than 32k elements forks torch's OpenMP team. With idle workers asleep
(OMP_WAIT_POLICY=PASSIVE, facescale's default) each fork wakes one, which on a VM costs more than a
[128, 512] op itself: ten such multiplies right after a GEMM took ~1 ms on 2 threads and 0.1 ms on one
(2-vCPU AMD EPYC VM), and a B = 128 step runs about a dozen. So the head brackets its forward, backward and
optimizer step in `small_ops_serial` (torch on one thread), and the work that pays for a fork (its GEMMs
and full [N, C'] passes) in `all_threads`; the native kernels (heads/native.py) size their own splits with
`thread_budget()`.

Nothing changes off the CPU, with one thread, or outside the head's brackets; results are the same
(torch's CPU kernels and ours do not depend on the thread count for these ops).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_state = threading.local()  # .budget: the caller's thread count while inside small_ops_serial, else unset


def thread_budget() -> int:
    """Threads the head's big work may use: the caller's count, also inside `small_ops_serial`."""
    return getattr(_state, "budget", None) or torch.get_num_threads()


@contextmanager
def small_ops_serial(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on this thread only, until `all_threads` asks for the budget back (re-entrant)."""
    budget = torch.get_num_threads()
    if device.type != "cpu" or budget == 1 or getattr(_state, "budget", None):
        yield
        return
    _state.budget = budget
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(budget)
        _state.budget = None


@contextmanager
def all_threads() -> Iterator[None]:
    """Inside `small_ops_serial`, give torch its whole budget back for one big op; elsewhere a no-op."""
    budget = getattr(_state, "budget", None)
    if not budget or torch.get_num_threads() == budget:  # outside the bracket, or already inside all_threads
        yield
        return
    torch.set_num_threads(budget)
    try:
        yield
    finally:
        torch.set_num_threads(1)
