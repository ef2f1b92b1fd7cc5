"""The reader-independent half of training input: the `TrainLoader` contract every reader implements, batch
normalisation and per-stream seeds (readers import this, never `loader`; their DataLoader: worker_loader)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

from facescale.data.bad_data import SkipPolicy
from facescale.errors import InputError

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainLoader(ABC):
    """An endless stream of equal full batches with a resumable cursor.

    Epoch `e` is a pure function of (data, seed, rank, world size, batch size, e): a loader restored with
    `load_state_dict({"epoch": e, "step_in_epoch": k})` yields exactly the batches an uninterrupted loader
    yields from batch k of epoch e on (readers rebuild epoch e and skip k batches: the cost of reading k
    batches, and of decoding them where a reader must, at most one epoch). `epoch` is the epoch of the batch
    last yielded. `seen` counts samples yielded; `skipped` counts bad samples left out under
    `data.on_bad_sample: skip`.
    """

    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0  # batches of `epoch` already yielded
    seen: int = 0
    policy: SkipPolicy
    planned_by_workers: bool = False  # whether an epoch's batches depend on data.num_workers (webdataset)
    skipped_is_per_set: bool = False  # `skipped`: a share of the set's bad samples, found at start (DALI)

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
