"""The DataLoader every facescale batch stream uses (webdataset reader, F2C identities): spawned workers of
one torch thread each, and their faults reported when a batch is fetched, at the trainer's step boundary
(train/lookahead.py), as one-line errors: a worker that died (LoaderWorkerDied), none that answers within
data.read_timeout_s (LoaderTimedOut)."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours below
import os
import signal
import threading
import time
from typing import Any

import torch

from facescale.errors import InputError
from launcher.preemption import DEFAULT_SIGNALS


def one_thread_worker(worker_id: int) -> None:
    """DataLoader worker init: one intra-op thread (tiny tensors; OpenMP spinning costs ~10x here), and Ctrl-C
    and the preemption signals left to the main process, which saves at the next step boundary and needs its
    workers until then: Slurm signals every process of the job step (`--signal=USR2@300` and scancel's TERM
    reach the workers too), and a spawned worker does not inherit the main process's Python handlers, so the
    signal's default action would kill it (no save, no requeue)."""
    torch.set_num_threads(1)
    for name in ("SIGINT", *DEFAULT_SIGNALS):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit handler was registered, so it runs before it (LIFO)
def _end_workers_at_exit() -> None:
    """At interpreter exit multiprocessing sends its daemonic children (DataLoader workers) SIGTERM and waits
    for them: ours ignore SIGTERM (above), so they are ended here, before that wait, with SIGKILL (they hold
    nothing to save)."""
    for child in multiprocessing.active_children():
        if child.daemon and child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)


class LoaderWorkerDied(InputError, RuntimeError):
    """A DataLoader worker process died (killed by the OOM killer or a memory limit, most often)."""

    default_fix = ("the kernel's OOM killer or the job's memory limit is the usual cause (see dmesg); lower "
                   "data.num_workers or give the job more memory, then run the same command to resume")


class LoaderTimedOut(InputError, RuntimeError):
    """No batch from the loader's workers within data.read_timeout_s (storage that hangs, most often)."""

    default_fix = ("check the data's mount on that node (a hung NFS/Lustre client, an unreachable server); "
                   "raise data.read_timeout_s if reading is this slow, then run the same command to resume")


TIMED_OUT = "DataLoader timed out after"  # how torch's message for a fetch past its timeout begins


def _death(worker: Any) -> str:
    code = worker.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"data-loader worker {worker.pid} {how}"


class _WorkerWatch:
    """torch's multiprocess batch iterator; whatever a fetch raises when a worker has died (torch's "exited
    unexpectedly", or a connection reset or EOF while a batch was being handed over) becomes
    LoaderWorkerDied naming the worker and the signal that killed it."""

    _DEATH_WAIT_S = 2.0  # a hand-over can break while the killed worker is still being torn down

    def __init__(self, inner: Any, first_timeout_s: float = 0.0) -> None:
        self._inner, self._first_timeout_s = inner, first_timeout_s

    def __iter__(self) -> _WorkerWatch:
        return self

    def __next__(self) -> Any:
        base = getattr(self._inner, "_timeout", 0)
        first, self._first_timeout_s = self._first_timeout_s, 0.0
        if not (base > 0 and first > base):
            return self._watched(next, self._inner)
        self._inner._timeout = first  # torch reads it at each fetch
        try:
            return self._watched(next, self._inner, f"{first} s (data.read_timeout_s, {base} s, for it and "
                                                    "for each batch a resume reads past before it)")
        finally:
            self._inner._timeout = base

    def _reset(self, loader: Any, *args: Any, **kwargs: Any) -> None:
        """torch's start of another epoch on persistent workers (it fetches from them too)."""
        self._watched(lambda inner: inner._reset(loader, *args, **kwargs), self._inner)

    def _watched(self, call: Any, inner: Any, limit: str = "") -> Any:
        """`call(inner)`, its failure named; `limit`: the time limit of this fetch in words, when not the
        usual data.read_timeout_s."""
        try:
            return call(inner)
        except (StopIteration, InputError):  # the end of the data, or a reader's own report (a bad sample)
            raise
        except Exception as error:
            deadline = time.monotonic() + self._DEATH_WAIT_S
            while True:
                dead = [w for w in getattr(inner, "_workers", []) if not w.is_alive() and w.exitcode]
                if dead or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if dead:
                raise LoaderWorkerDied("; ".join(_death(w) for w in dead)) from error
            if str(error).startswith(TIMED_OUT):
                for worker in getattr(inner, "_workers", []):  # stuck: a stopped one would block the exit
                    with contextlib.suppress(Exception):
                        worker.kill()
                limit = limit or f"data.read_timeout_s ({getattr(inner, '_timeout', '?')} s)"
                raise LoaderTimedOut(f"no batch from this rank's data-loader workers within {limit}") \
                    from error
            raise

    def __getattr__(self, name: str) -> Any:  # the rest of torch's iterator
        return getattr(self._inner, name)


class _StepBoundaryDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose dead workers are reported when a batch is fetched, not by a signal handler.

    torch's SIGCHLD handler raises in whatever the main thread runs when a worker dies: mid-step, inside a
    collective the other ranks then wait in, so nothing is saved. Without it, fetching a batch finds the
    dead worker within torch's status-check interval (5 s), at the step boundary where the trainer reads
    the next batches ahead and every rank saves before stopping (train/lookahead.py)."""

    first_timeout_s = 0.0  # the first fetch's time limit, when longer than `timeout` (batch_stream_loader)

    def _get_iterator(self) -> Any:
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGCHLD) if main else None
        iterator = super()._get_iterator()
        if main and signal.getsignal(signal.SIGCHLD) is not before:  # torch installed its handler just now
            signal.signal(signal.SIGCHLD, signal.SIG_DFL if before is None else before)
        return _WorkerWatch(iterator, self.first_timeout_s) if self.num_workers else iterator


def batch_stream_loader(dataset: torch.utils.data.IterableDataset, num_workers: int,
                        pin_memory: bool = False, timeout_s: float = 0.0,
                        first_timeout_s: float = 0.0) -> torch.utils.data.DataLoader:
    """The DataLoader for an IterableDataset that yields whole batches, with the worker settings every
    facescale loader shares: persistent, one torch thread each, 2 batches prefetched per worker, and
    started with spawn: a forked worker inherits other threads' locks (DALI, gloo, queue feeders) and
    objects whose finalisers hang in a child (a DALI pipeline's __del__ did, in the test suite). A worker
    that dies is reported at the next fetch (see _StepBoundaryDataLoader), and so is one that gives no batch
    within `timeout_s` (0: no limit), as LoaderTimedOut; the first fetch may take `first_timeout_s` when
    that is longer (a resumed epoch's workers first read past the batches before the cursor)."""
    loader = _StepBoundaryDataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None, worker_init_fn=one_thread_worker,
        pin_memory=pin_memory, prefetch_factor=2 if num_workers else None,
        timeout=timeout_s if num_workers else 0.0)
    loader.first_timeout_s = first_timeout_s
    return loader
