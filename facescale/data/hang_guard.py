"""A last-resort limit on reads that may never return (storage that hangs), armed around them.

DALI holds the GIL while a pipeline build blocks opening a file (measured: every other Python thread of the
process stops), so a watchdog written in Python cannot run, and when shared storage hangs every rank waits
alike, so no collective timeout ends the job either: it would hang until its time limit. faulthandler's
timer is a C thread that needs no GIL: past the limit it writes every thread's traceback to stderr (where it
hung) and ends the process with exit code 1; the launcher (srun --kill-on-bad-exit, torchrun) then ends the
other ranks. The timer is process-wide, so overlapping limits (a read on the main thread, a pipeline built
ahead on a helper thread) share it: it is set to the earliest deadline of those in force.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_deadlines: dict[int, float] = {}  # id of an active limit -> its monotonic deadline
_lock = threading.Lock()
_next_id = iter(range(1 << 62))


def _stderr_fd() -> int | None:
    """The process's stderr as a file descriptor for faulthandler (None where there is none)."""
    try:
        return sys.__stderr__.fileno() if sys.__stderr__ is not None else None
    except (AttributeError, ValueError, OSError):
        return None


def _rearm() -> None:
    """Set faulthandler's timer to the earliest deadline in force, or cancel it (holding _lock)."""
    fd = _stderr_fd()
    if not _deadlines or fd is None:
        faulthandler.cancel_dump_traceback_later()
        return
    left = max(0.001, min(_deadlines.values()) - time.monotonic())
    faulthandler.dump_traceback_later(left, exit=True, file=fd)


def read_hang_limit_s(cfg: Any) -> float:
    """How long a read may block before its rank ends (a training Config): dist.timeout_s, the limit a hung
    collective gets; none where data.read_timeout_s is 0 (wait for ever)."""
    return cfg.dist.timeout_s if cfg.data.read_timeout_s > 0 else 0.0


@contextmanager
def hang_limit(seconds: float) -> Iterator[None]:
    """End the process (tracebacks on stderr, exit code 1) if this block runs longer than `seconds`; a
    no-op for `seconds` <= 0."""
    if seconds <= 0:
        yield
        return
    with _lock:
        key = next(_next_id)
        _deadlines[key] = time.monotonic() + seconds
        _rearm()
    try:
        yield
    finally:
        with _lock:
            del _deadlines[key]
            _rearm()
