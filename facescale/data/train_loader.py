"""The reader-independent half of training input: the `TrainLoader` contract every reader implements, batch
normalisation, the shared DataLoader settings and per-stream seeds (readers import this, never `loader`)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from facescale.data.bad_data import SkipPolicy
from facescale.errors import InputError

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainLoader(ABC):
    """An endless stream of equal full batches with a resumable cursor.

    Epoch `e` is a pure function of (data, seed, rank, world size, batch size, e): a loader restored with
    `load_state_dict({"epoch": e, "step_in_epoch": k})` yields exactly the batches an uninterrupted loader
    yields from batch k of epoch e on (readers rebuild epoch e and skip k batches: the cost of k batches
    of reading and decoding, at most one epoch). `epoch` is the epoch of the batch last yielded. `seen`
    counts samples yielded; `skipped` counts bad samples left out under `data.on_bad_sample: skip`.
    """

    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already yielded
    seen: int = 0
    policy: SkipPolicy
    planned_by_workers: bool = False  # whether an epoch's batches depend on data.num_workers (webdataset)

    @property
    def skipped(self) -> int:
        """Bad samples left out so far (always 0 under `on_bad_sample: error`, which raises instead)."""
        return self.policy.skipped

    @abstractmethod
    def epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """Batches `skip` .. `steps_per_epoch - 1` of epoch `epoch`."""

    def reset(self) -> None:  # noqa: B027 - an optional hook; readers without state need nothing
        """Drop any pipeline or worker state of a partly read epoch (called when the cursor moves)."""

    def iter_epoch(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch; if it is finished, roll over to the next epoch first."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        finished = False
        try:
            for batch in self.epoch_batches(self.epoch, self.step_in_epoch):
                self.step_in_epoch += 1
                self.seen += int(batch[1].shape[0])
                yield batch
            finished = True
        finally:
            if not finished:  # abandoned mid-epoch: the next call rebuilds from the cursor
                self.reset()
        if self.step_in_epoch != self.steps_per_epoch:
            raise RuntimeError(f"{type(self).__name__} produced {self.step_in_epoch} batches in epoch "
                               f"{self.epoch}, expected {self.steps_per_epoch}")

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches forever, advancing `epoch` before the first batch of each new epoch."""
        while True:
            yield from self.iter_epoch()

    def state_dict(self) -> dict[str, int]:
        """The cursor of the next batch: {"epoch": e, "step_in_epoch": k} (k < steps_per_epoch)."""
        if self.step_in_epoch >= self.steps_per_epoch:
            return {"epoch": self.epoch + 1, "step_in_epoch": 0}
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a cursor saved by `state_dict` (same data, seed, world size and batch size)."""
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise LoaderStateError(
                f"the checkpoint's data position {state} is outside this run's epoch of "
                f"{self.steps_per_epoch} steps: it was saved with another global batch size or data set",
                fix="resume with the schedule.global_batch_size and data.shards it was saved with (its "
                    "config.yaml), or start a new run from its weights (model.init_from)")
        self.reset()
        self.epoch, self.step_in_epoch = epoch, step


def normalize_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> contiguous float32 [B, 3, H, W], (x - 127.5) / 127.5, computed on `device`.

    The transposing copy converts to float in the same pass (a third less memory traffic than
    permute-contiguous-then-float), then two in-place passes.
    """
    images = images.to(device, non_blocking=True)
    batch, height, width, channels = images.shape
    out = torch.empty((batch, channels, height, width), dtype=torch.float32, device=device)
    out.copy_(images.permute(0, 3, 1, 2))
    return out.sub_(127.5).div_(127.5)


def _one_thread_worker(worker_id: int) -> None:
    """DataLoader worker init: one intra-op thread (tiny tensors; OpenMP spinning costs ~10x here), and Ctrl-C
    left to the main process (it saves at the next step boundary, and needs its workers until then)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __iter__(self) -> _WorkerWatch:
        return self

    def __next__(self) -> Any:
        return self._watched(next, self._inner)

    def _reset(self, loader: Any, *args: Any, **kwargs: Any) -> None:
        """torch's start of another epoch on persistent workers (it fetches from them too)."""
        self._watched(lambda inner: inner._reset(loader, *args, **kwargs), self._inner)

    def _watched(self, call: Any, inner: Any) -> Any:
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
                limit = getattr(inner, "_timeout", "?")
                raise LoaderTimedOut(f"no batch from this rank's data-loader workers within "
                                     f"data.read_timeout_s ({limit} s)") from error
            raise

    def __getattr__(self, name: str) -> Any:  # the rest of torch's iterator
        return getattr(self._inner, name)


class _StepBoundaryDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose dead workers are reported when a batch is fetched, not by a signal handler.

    torch's SIGCHLD handler raises in whatever the main thread runs when a worker dies: mid-step, inside a
    collective the other ranks then wait in, so nothing is saved. Without it, fetching a batch finds the
    dead worker within torch's status-check interval (5 s), at the step boundary where the trainer reads
    the next batches ahead and every rank saves before stopping (train/lookahead.py)."""

    def _get_iterator(self) -> Any:
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGCHLD) if main else None
        iterator = super()._get_iterator()
        if main and signal.getsignal(signal.SIGCHLD) is not before:  # torch installed its handler just now
            signal.signal(signal.SIGCHLD, signal.SIG_DFL if before is None else before)
        return _WorkerWatch(iterator) if self.num_workers else iterator


def batch_stream_loader(dataset: torch.utils.data.IterableDataset, num_workers: int,
                        pin_memory: bool = False, timeout_s: float = 0.0) -> torch.utils.data.DataLoader:
    """The DataLoader for an IterableDataset that yields whole batches, with the worker settings every
    facescale loader shares: persistent, one torch thread each, 2 batches prefetched per worker, and
    started with spawn: a forked worker inherits other threads' locks (DALI, gloo, queue feeders) and
    objects whose finalisers hang in a child (a DALI pipeline's __del__ did, in the test suite). A worker
    that dies is reported at the next fetch (see _StepBoundaryDataLoader), and so is one that gives no batch
    within `timeout_s` (0: no limit), as LoaderTimedOut."""
    return _StepBoundaryDataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None, worker_init_fn=_one_thread_worker,
        pin_memory=pin_memory, prefetch_factor=2 if num_workers else None,
        timeout=timeout_s if num_workers else 0.0)


class TooFewSamplesError(InputError, ValueError):
    """The shards hold less than one batch for every rank; each rank counts the same and raises alike."""

    every_rank = True


class LoaderStateError(InputError, ValueError):
    """A saved data position that does not fit this run's epoch; every rank's loader refuses it alike."""

    every_rank = True


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, source: str = "the shards") -> int:
    """Full batches per rank per epoch, `num_samples // (world_size * batch_size)`, the same on every rank."""
    steps = num_samples // (world_size * batch_size)
    if steps < 1:
        raise TooFewSamplesError(
            f"{num_samples} samples, fewer than one batch of {batch_size} for each of {world_size} ranks",
            where=source, fix="lower schedule.batch_per_rank (or global_batch_size), or add data")
    return steps


def stream_seed(*words: int) -> int:
    """A 31-bit seed mixed from words such as (seed, rank, worker, epoch); distinct words, unrelated seeds."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0] & 0x7FFFFFFF)
