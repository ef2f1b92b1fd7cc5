"""The next step's batches, read at the step boundary, so that a data failure is known before the step.

A batch that cannot be read (a bad sample under `data.on_bad_sample: error`, a shard cut or gone) used to
raise inside the step on one rank while the others waited in its collectives: the run ended without a save.
Read one step ahead (all its micro-batches under gradient accumulation), the failure is reported in the
step-boundary agreement instead (see the trainer), so every rank saves the last finished step first. Any
exception of the reader counts, not only input errors: a data-loader worker killed (the kernel's OOM killer,
a node's memory cgroup) or a reader's own bug loses no trained step either.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any


class BatchLookahead:
    """Iterates `source`; `read_ahead(n)` takes the next n batches early and holds them (or the error)."""

    def __init__(self, source: Iterator, cursor: Callable[[], dict | None]) -> None:
        self.source, self._cursor = source, cursor
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
        try:
            for _ in range(count):
                self._held.append(next(self.source))
        except Exception as error:  # noqa: BLE001 - raised by the trainer after every rank has saved
            self._failed = True
            return error
        finally:
            self._wait_s += time.perf_counter() - start
        return None

    def take_wait(self) -> float:
        """Seconds spent reading ahead since the last call (the data wait of the step that uses the batch)."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait

    def cursor(self) -> dict | None:
        """The loader's position of the first batch not trained on: what a checkpoint saves."""
        return self._held_cursor if self._held or self._failed else self._cursor()
