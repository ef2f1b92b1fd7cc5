"""Pick and build the training reader (DALI or webdataset) for one rank; both yield identical batches.

Batches are `(images, labels)`: float32 [B, 3, H, W] in [-1, 1] ((x - 127.5) / 127.5, RGB) and int64 [B],
on the model's device. Both readers decode, augment and mirror into uint8 [B, H, W, 3] batches and leave the
normalisation to `normalize_batch` on the model's device (4x fewer bytes to move; free on a GPU).
Training is step-based: a TrainLoader iterates forever, rolling epochs over internally, and every rank
gets exactly `steps_per_epoch = N // (world * B)` equal full batches per epoch.

Epoch guarantee (both readers with `data.shard_sampling: exact`, N samples in the manifest, all good): the
concatenated sample list is split into `world` contiguous parts by sample count; in every epoch each rank
reads only its part, no sample is yielded twice, and exactly `N mod (world * B)` samples are left out (the
ones still in the shuffle buffer when a rank's quota is reached). Both readers assign the parts differently
per epoch (DALI rotates `shard_id`; webdataset permutes the shard order with the epoch seed). Under
`on_bad_sample: skip` the bad samples are left out too; DALI drops them before the split (pre-scan),
webdataset replaces them with later samples of the same stream, repeating samples of its part only when the
bad ones outnumber the `N mod (world * B)` spare ones.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from facescale.config.schema import DataConfig
from facescale.data.bad_data import SkipPolicy
from facescale.data.manifest import Manifest, ManifestError

READERS = ("auto", "dali", "webdataset")
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
            raise ValueError(f"loader state {state} is outside [0, {self.steps_per_epoch}] steps per epoch; "
                             "was it saved with another batch size, world size or data set?")
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
    """DataLoader worker init: one intra-op thread (tiny tensors; OpenMP spinning costs ~10x here)."""
    torch.set_num_threads(1)


def batch_stream_loader(dataset: torch.utils.data.IterableDataset, num_workers: int,
                        pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader for an IterableDataset that yields whole batches, with the worker settings every
    facescale loader shares: persistent, one torch thread each, 2 batches prefetched per worker, and
    started with spawn: a forked worker inherits other threads' locks (DALI, gloo, queue feeders) and
    objects whose finalisers hang in a child (a DALI pipeline's __del__ did, in the test suite)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None, worker_init_fn=_one_thread_worker,
        pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, source: str = "the shards") -> int:
    """Full batches per rank per epoch, `num_samples // (world_size * batch_size)`, the same on every rank."""
    steps = num_samples // (world_size * batch_size)
    if steps < 1:
        raise ValueError(f"{source} hold {num_samples} samples, fewer than one batch of {batch_size} for "
                         f"each of {world_size} ranks; lower the batch size or add data")
    return steps


def stream_seed(*words: int) -> int:
    """A 31-bit seed mixed from words such as (seed, rank, worker, epoch); distinct words, unrelated seeds."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0] & 0x7FFFFFFF)


def dali_available() -> bool:
    """Whether `nvidia.dali` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def resolve_reader(reader: str) -> str:
    """Map `data.reader` to "dali" or "webdataset"; "auto" picks DALI when it is installed."""
    if reader not in READERS:
        raise ValueError(f"data.reader must be one of {', '.join(READERS)}, got {reader!r}")
    if reader == "auto":
        return "dali" if dali_available() else "webdataset"
    if reader == "dali" and not dali_available():
        raise ImportError("data.reader is 'dali' but nvidia.dali is not importable; install the [dali] "
                          "extra (pip install nvidia-dali-cuda120) or set data.reader to 'webdataset'")
    return reader


def load_shard_manifest(data_cfg: DataConfig, need_index: bool) -> Manifest:
    """Read `data.shards/manifest.json` and check the tars (and `.idx` files when `need_index`) exist."""
    if not data_cfg.shards:
        raise ManifestError("data.shards is empty; set it to a directory written by "
                            "`facescale synth --out DIR` or a facescale converter")
    manifest = Manifest.load(data_cfg.shards)
    if manifest.image_size != data_cfg.image_size:
        raise ValueError(f"{Path(data_cfg.shards) / 'manifest.json'}: shards hold {manifest.image_size}px "
                         f"images but data.image_size is {data_cfg.image_size}; make them agree")
    for tar in manifest.shard_paths():
        if not tar.is_file():
            raise FileNotFoundError(f"{tar} is listed in manifest.json but missing; restore it or regenerate "
                                    "the shard directory")
    if need_index:
        for index in manifest.index_paths():
            if not index.is_file():
                raise FileNotFoundError(f"{index} (DALI index) is missing; recreate it with "
                                        f"`python -c \"from facescale.data.shard_writer import index_tar; "
                                        f"index_tar('{index.with_suffix('.tar')}')\"` or `wds2idx`")
    return manifest


def build_train_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int,
                       device: torch.device, epoch: int = 0) -> TrainLoader:
    """The training reader of `rank` out of `world_size`, per `data_cfg.reader`; batches land on `device`."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1; got rank {rank}, world_size "
                         f"{world_size}, batch_size {batch_size}")
    reader = resolve_reader(data_cfg.reader)
    if reader == "dali" and data_cfg.shard_sampling != "exact":
        raise ValueError(f"data.shard_sampling={data_cfg.shard_sampling} is a webdataset-reader mode, but "
                         "data.reader resolved to dali; set data.reader=webdataset")
    manifest = load_shard_manifest(data_cfg, need_index=reader == "dali")
    if reader == "dali":
        from facescale.data.dali_reader import DaliTrainLoader

        return DaliTrainLoader(manifest, data_cfg, rank=rank, world_size=world_size, batch_size=batch_size,
                               seed=seed, device=device, epoch=epoch)
    from facescale.data.wds_reader import WdsTrainLoader

    return WdsTrainLoader(manifest, data_cfg, rank=rank, world_size=world_size, batch_size=batch_size,
                          seed=seed, device=device, epoch=epoch)
