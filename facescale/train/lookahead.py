"""The next step's batches, read at the step boundary, so that a data failure is known before the step.

A batch that cannot be read (a bad sample under `data.on_bad_sample: error`, a shard cut or gone) used to
raise inside the step on one rank while the others waited in its collectives: the run ended without a save.
Read one step ahead (all its micro-batches under gradient accumulation), the failure is reported in the
step-boundary agreement instead (see the trainer), so every rank saves the last finished step first. Any
exception of the reader counts, not only input errors: a data-loader worker killed (the kernel's OOM killer,
a node's memory cgroup) or a reader's own bug loses no trained step either. A read that never returns (hung
storage under a reader that cannot time out) is named, then ends the rank at dist.timeout_s (ReadWatchdog).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from facescale.data.hang_guard import hang_limit
from facescale.parallel.failure import COLLECTIVE_FAILURE_EXIT_CODE

BACKSTOP_S = 30.0  # data/hang_guard.py's limit, after the watchdog's own end: for a reader holding the GIL


class ReadWatchdog:
    """Runs each stage's action once a read has been armed for longer than its delay (a warning, then ending
    the process); one daemon thread for the whole run, so arming and disarming each step costs a lock."""

    def __init__(self, stages: list[tuple[float, Callable[[], None]]]) -> None:
        self._stages = sorted(stages, key=lambda stage: stage[0])
        self._armed_at: float | None = None
        self._done = 0  # stages already run in this wait
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self) -> None:
        with self._changed:
            self._armed_at, self._done = time.monotonic(), 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="facescale-read-watchdog",
                                                daemon=True)
                self._thread.start()
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._armed_at = None
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._armed_at is None or self._done == len(self._stages):
                    self._changed.wait()
                    continue
                after, action = self._stages[self._done]
                left = self._armed_at + after - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self._done += 1
                action()


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _end(line: str) -> None:
    """End this rank at once (the main thread is stuck in the reader and cannot be interrupted); the
    launcher (srun --kill-on-bad-exit, torchrun) then ends the others, and the job is not left hanging."""
    _say(line)
    os._exit(COLLECTIVE_FAILURE_EXIT_CODE)  # a hung rank's code, as for a hung collective: no requeue


class BatchLookahead:
    """Iterates `source`; `read_ahead(n)` takes the next n batches early and holds them (or the error)."""

    def __init__(self, source: Iterator, cursor: Callable[[], dict | None], warn_after_s: float = 0.0,
                 end_after_s: float = 0.0, who: str = "") -> None:
        """`warn_after_s`, `end_after_s` (both > 0): a read ahead still waiting after the first says so on
        stderr, naming `who`, and after the second ends the process (data/hang_guard.py's limit, 30 s
        later, ends it even when the reader holds the GIL): a reader that cannot stop its own wait (DALI's,
        or one in the main thread) would otherwise hang the job, silently, until its time limit (every rank
        waits alike when shared storage hangs, so no collective timeout ends it)."""
        self.source, self._cursor = source, cursor
        self._watchdog: ReadWatchdog | None = None
        self._end_after_s = end_after_s
        if warn_after_s > 0 and end_after_s > 0:
            hang = f"[facescale] {who}: no batch after"
            self._watchdog = ReadWatchdog([
                (warn_after_s, lambda: _say(
                    f"{hang} {warn_after_s:g} s; the data's storage may hang (check its mount); this reader "
                    f"cannot stop the wait: this rank ends at {end_after_s:g} s if it still has none")),
                (end_after_s, lambda: _end(
                    f"{hang} {end_after_s:g} s (dist.timeout_s): ending this rank so that the job does not "
                    "hang; run it again to resume from its last checkpoint once the storage answers")),
            ])
        self._held: deque[Any] = deque()  # batches read ahead, not yet trained on, in order
        self._held_cursor: dict | None = None  # the loader's cursor before they were read (or failed)
        self._failed = False
        self._wait_s = 0.0

    def __iter__(self) -> BatchLookahead:
        return self

    def __next__(self) -> Any:
        return self._held.popleft() if self._held else next(self.source)

    def read_ahead(self, count: int = 1) -> Exception | None:
        """Read the next `count` batches now; return the error that stopped them (not raised)."""
        if self._held:
            return None
        self._held_cursor = self._cursor()
        start = time.perf_counter()
        if self._watchdog is not None:
            self._watchdog.arm()
        try:
            with hang_limit(self._end_after_s + BACKSTOP_S if self._end_after_s > 0 else 0.0):
                for _ in range(count):
                    self._held.append(next(self.source))
        except Exception as error:  # noqa: BLE001 - raised by the trainer after every rank has saved
            self._failed = True
            return error
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()
            self._wait_s += time.perf_counter() - start
        return None

    def take_wait(self) -> float:
        """Seconds spent reading ahead since the last call (the data wait of the step that uses the batch)."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def cursor(self) -> dict | None:
        """The loader's position of the first batch not trained on: what a checkpoint saves."""
        return self._held_cursor if self._held or self._failed else self._cursor()
