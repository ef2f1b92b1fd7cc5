"""The pure-Python training reader: `webdataset` tar streams decoded with simplejpeg in DataLoader workers.

Two ways to cut epochs (`data.shard_sampling`): `exact` (default, below) reads every sample once per epoch
across all ranks; `resampled` is webdataset's multi-node recipe: each rank and worker draws whole shards
with replacement (`webdataset.ResampledShards`, seeded by (seed, epoch, rank, worker)) and an epoch is a
fixed `steps_per_epoch` batches, so samples may repeat or be missed within an epoch. Both are
deterministic per (seed, epoch), so the cursor restores either exactly.

Under `exact`, each worker reads its planned sample ranges (`facescale.data.tar_samples.epoch_plan`),
shuffles them in a seeded buffer and fills its batches; so ranks get equal batch counts, and an epoch can be
rebuilt and fast-forwarded exactly on resume. Bad samples are rejected or skipped per
`data.on_bad_sample`; a skipped sample is replaced by the next one of the stream (after the range, the
range is read again), so batch counts stay equal. Workers ship uint8 HWC batches; normalisation runs on
the target device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from facescale.config.schema import DataConfig, ShardSamplingKind, choices
from facescale.data.augment import NO_AUGMENT, Augment, augment_numpy
from facescale.data.bad_data import BadSample, BadSampleError, SkipPolicy, check_image, check_label
from facescale.data.jpeg import decode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT, decode_label
from facescale.data.tar_samples import epoch_plan, read_segment, resampled_samples, worker_share
from facescale.data.train_loader import Batch, TrainLoader, normalize_batch, steps_per_epoch, stream_seed
from facescale.data.worker_loader import batch_stream_loader

_SHUFFLE, _MIRROR, _AUGMENT, _RESAMPLE = 12, 13, 14, 15
SHARD_SAMPLING = choices(ShardSamplingKind)
_AGAIN = BadSample("", "", -1, "marks the start of a refill pass over the worker's range")
_PIXEL = np.zeros((1, 1, 3), np.uint8)  # augmented in place of a passed-over image, for its random draws


def sample_label(sample: dict[str, Any], num_classes: int) -> int | str:
    """A `{jpg, lbl}` tar sample's label, or the reason it is bad short of its JPEG (which is not decoded)."""
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in sample:
            return f"missing .{ext} member"
    try:
        label = decode_label(sample[LABEL_EXT])
    except ValueError as error:
        return str(error)
    return check_label(label, num_classes) or label


def decode_sample(sample: dict[str, Any], image_size: int, num_classes: int, out: np.ndarray | None = None,
                  decoder: str = "auto") -> tuple[np.ndarray, int] | str:
    """A `{jpg, lbl}` tar sample as (HWC uint8 RGB, label), or the reason it is bad; decodes into `out`."""
    label = sample_label(sample, num_classes)
    if isinstance(label, str):
        return label
    try:
        image = decode_jpeg(sample[IMAGE_EXT], out, decoder)
    except Exception:  # noqa: BLE001 - decoders raise assorted types; check_image words the reason
        return check_image(sample[IMAGE_EXT], image_size) or "JPEG does not decode"
    if image.shape != (image_size, image_size, 3):
        return f"image is {image.shape}, expected {image_size}px RGB"
    return image, label


class RankStream(IterableDataset):
    """One rank's batches; worker w of n yields its share of epoch `start_epoch + k` on its k-th iteration."""

    def __init__(self, urls: list[str], shard_sizes: list[int], *, rank: int, world_size: int, seed: int,
                 start_epoch: int, start_step: int, batch_size: int, steps: int, num_workers: int,
                 shuffle_buffer: int, mirror: bool, image_size: int, num_classes: int,
                 policy: SkipPolicy, augment: Augment = NO_AUGMENT, decoder: str = "auto",
                 sampling: str = "exact") -> None:
        super().__init__()
        self.urls, self.shard_sizes, self.rank, self.world_size = urls, shard_sizes, rank, world_size
        self.seed, self.start_epoch, self.start_step = seed, start_epoch, start_step
        self.batch_size, self.steps, self.num_workers = batch_size, steps, max(1, num_workers)
        self.shuffle_buffer, self.mirror, self.image_size = shuffle_buffer, mirror, image_size
        self.num_classes, self.policy, self.augment, self.decoder = num_classes, policy, augment, decoder
        if sampling not in SHARD_SAMPLING:
            raise ValueError(f"data.shard_sampling must be one of {', '.join(SHARD_SAMPLING)}, "
                             f"got {sampling!r}")
        self.sampling = sampling
        self._iterations = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This worker's batches of the next epoch as (uint8 images, labels, bad samples skipped for it)."""
        info = get_worker_info()
        epoch = self.start_epoch + self._iterations
        skip = self.start_step if self._iterations == 0 else 0
        self._iterations += 1
        # The DataLoader asks workers 0, 1, .. in turn from every new iterator on; batch j of an epoch comes
        # from the worker playing role j % n, so after skipping `skip` batches worker 0 plays role skip % n.
        worker = ((info.id if info is not None else 0) + skip) % self.num_workers
        own_skip = skip // self.num_workers + (1 if worker < skip % self.num_workers else 0)
        share = worker_share(self.steps, self.num_workers, worker)
        source = self._resampled if self.sampling == "resampled" else self._exact
        batches = self._batches(source(epoch, worker), epoch, worker, passed=own_skip)
        for _ in range(share - own_skip):
            yield next(batches)

    def _resampled(self, epoch: int, worker: int) -> Iterator[dict[str, Any] | BadSample]:
        """The worker's endless stream of resampled shards through a seeded shuffle buffer."""
        stream = resampled_samples(self.urls, self.shard_sizes,
                                   stream_seed(self.seed, _RESAMPLE, epoch, self.rank, worker))
        buffer = shuffle(self.shuffle_buffer, self.shuffle_buffer,
                         seed=stream_seed(self.seed, _SHUFFLE, epoch, self.rank, worker))
        bad_run = 0
        for sample in buffer(stream):
            bad_run = bad_run + 1 if isinstance(sample, BadSample) else 0
            if bad_run > sum(self.shard_sizes):
                raise BadSampleError(f"rank {self.rank} worker {worker}: no good sample in "
                                     f"{bad_run} resampled ones; run `facescale validate` on the shards")
            yield sample

    def _exact(self, epoch: int, worker: int) -> Iterator[dict[str, Any] | BadSample]:
        """The worker's planned range shuffled in a seeded buffer, then again (reshuffled) for as long as
        needed, with `_AGAIN` between passes."""
        segments = epoch_plan(self.shard_sizes, epoch=epoch, seed=self.seed, rank=self.rank,
                              world_size=self.world_size, steps=self.steps, batch_size=self.batch_size,
                              num_workers=self.num_workers)[worker]
        for cycle in range(1 << 30):
            stream = (s for shard, first, end in segments for s in read_segment(self.urls[shard], first, end))
            good, first_bad = 0, None
            if cycle:
                yield _AGAIN  # bad samples from here on were counted in the first pass
            buffer = shuffle(self.shuffle_buffer, self.shuffle_buffer,
                             seed=stream_seed(self.seed, _SHUFFLE, epoch, self.rank, worker, cycle))
            for sample in buffer(stream):
                good += not isinstance(sample, BadSample)
                first_bad = first_bad or (sample if isinstance(sample, BadSample) else None)
                yield sample
            if not good:
                count = sum(end - first for _, first, end in segments)
                raise BadSampleError(f"rank {self.rank} worker {worker}: no good sample in its part of epoch "
                                     f"{epoch} ({count} samples in {len(segments)} shards); the first met: "
                                     f"{first_bad}", fix="run `facescale validate` on the shards")

    def _new_batch(self) -> torch.Tensor:
        """An empty uint8 [B, H, W, 3] batch; in a worker it lives in shared memory, so the DataLoader hands
        the parent a handle instead of copying it."""
        images = torch.empty((self.batch_size, self.image_size, self.image_size, 3), dtype=torch.uint8)
        return images.share_memory_() if get_worker_info() is not None else images

    def _batches(self, samples: Iterator[dict[str, Any] | BadSample], epoch: int, worker: int,
                 passed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Decode straight into the batch; mirror in place with torch (a reversed numpy copy is 5x slower).

        The first `passed` batches (a resume's fast-forward) are read past without being made: their samples
        take the same random draws, and under `on_bad_sample: error` their JPEGs are not decoded (a bad one
        would have stopped the run before it saved its cursor); under `skip` decoding tells which were bad.
        """
        flips = np.random.default_rng(stream_seed(self.seed, _MIRROR, epoch, self.rank, worker))
        draws = np.random.default_rng(stream_seed(self.seed, _AUGMENT, epoch, self.rank, worker))
        images = self._new_batch()
        pixels = images.numpy()
        labels = np.empty(self.batch_size, np.int64)
        filled = skipped = 0
        repeat = False
        for sample in samples:
            if sample is _AGAIN:
                repeat = True
                continue
            slot = pixels[filled]
            if isinstance(sample, BadSample):
                decoded: tuple[np.ndarray, int] | int | str = sample.reason
            elif passed and self.policy.policy == "error":
                decoded = sample_label(sample, self.num_classes)
            else:
                decoded = decode_sample(sample, self.image_size, self.num_classes, slot, self.decoder)
            if isinstance(decoded, str):
                where = sample if isinstance(sample, BadSample) else \
                    BadSample(sample["__url__"], sample["__key__"], -1, decoded)
                if not repeat:
                    self.policy.reject(where)
                    skipped += 1
                continue
            if passed:
                if self.augment.active:
                    augment_numpy(_PIXEL, self.augment, draws)  # the draws an image takes
                if self.mirror:
                    flips.random()
            else:
                image, labels[filled] = decoded
                if self.augment.active:
                    slot[...] = augment_numpy(image, self.augment, draws)
                elif image is not slot:
                    slot[...] = image
                if self.mirror and flips.random() < 0.5:
                    images[filled].copy_(images[filled].flip(1))
            filled += 1
            if filled == self.batch_size:
                if passed:
                    passed -= 1
                else:
                    yield images, torch.from_numpy(labels.copy()), skipped
                    images = self._new_batch()
                    pixels = images.numpy()
                filled = skipped = 0


class WdsTrainLoader(TrainLoader):
    """TrainLoader over webdataset tar streams in a torch DataLoader with `data.num_workers` workers."""

    def __init__(self, manifest: Manifest, data_cfg: DataConfig, *, rank: int, world_size: int,
                 batch_size: int, seed: int, device: torch.device, epoch: int = 0) -> None:
        self.steps_per_epoch = steps_per_epoch(manifest.num_samples, world_size, batch_size,
                                               source=str(manifest.directory))
        self.manifest, self.cfg = manifest, data_cfg
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.epoch, self.step_in_epoch, self.seen = epoch, 0, 0
        self.device = torch.device(device)
        self.policy = SkipPolicy(data_cfg.on_bad_sample, data_cfg.max_skip_fraction)
        self.planned_by_workers = True  # each worker reads its own planned part of the epoch
        self.part_size = manifest.num_samples // world_size
        self._loader: DataLoader | None = None
        self._loader_epoch = -1
        self._skipped_in_epoch = 0

    def _make_loader(self) -> DataLoader:
        """A DataLoader whose workers start at the cursor and then walk the following epochs in order."""
        dataset = RankStream([str(p) for p in self.manifest.shard_paths()],
                             [s.num_samples for s in self.manifest.shards], rank=self.rank,
                             world_size=self.world_size, seed=self.seed, start_epoch=self.epoch,
                             start_step=self.step_in_epoch, batch_size=self.batch_size,
                             steps=self.steps_per_epoch,
                             num_workers=self.cfg.num_workers, shuffle_buffer=self.cfg.shuffle_buffer,
                             mirror=self.cfg.random_mirror, image_size=self.manifest.image_size,
                             num_classes=self.manifest.num_classes,
                             policy=SkipPolicy(self.policy.policy, 1.0),
                             augment=Augment.from_config(self.cfg), decoder=self.cfg.jpeg_decoder,
                             sampling=self.cfg.shard_sampling)
        passed = -(-self.step_in_epoch // max(1, self.cfg.num_workers))  # at most, by one worker
        return batch_stream_loader(dataset, self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                   timeout_s=self.cfg.read_timeout_s,
                                   first_timeout_s=self.cfg.read_timeout_s * (1 + passed))

    def reset(self) -> None:
        """Shut the workers down; the next epoch starts new ones at the cursor."""
        self._loader, self._loader_epoch = None, -1

    def epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """Batches `skip`.. of `epoch`: the workers' shares, normalised on the target device."""
        if self._loader is None or self._loader_epoch != epoch or skip:
            self._loader = self._make_loader()
        self._loader_epoch = epoch + 1  # the workers' next iteration is the next epoch
        self._skipped_in_epoch = 0
        for images, labels, skipped in self._loader:
            self.policy.skipped += int(skipped)
            self._skipped_in_epoch += int(skipped)
            self.policy.check_budget(self._skipped_in_epoch, self.part_size,
                                     f"rank {self.rank}, epoch {epoch}")
            yield normalize_batch(images, self.device), labels.to(self.device, non_blocking=True)
