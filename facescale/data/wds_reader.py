"""The pure-Python training reader: `webdataset` tar streams decoded with simplejpeg in DataLoader workers.

Epoch `e` is planned from (seed, e) alone: the shards are put in a seeded order, the concatenated sample
list is split into `world` contiguous parts by sample count (like DALI), and each rank's part is split over
its workers in proportion to the batches each worker yields. A worker reads its range with webdataset's
tar iterator, shuffles it in a seeded buffer and fills its batches; so ranks get equal batch counts, and an
epoch can be rebuilt and fast-forwarded exactly on resume. Bad samples are rejected or skipped per
`data.on_bad_sample`; a skipped sample is replaced by the next one of the stream (after the range, the
range is read again), so batch counts stay equal. Workers ship uint8 HWC batches; normalisation runs on
the target device.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle
from webdataset.tariterators import tar_file_iterator

from facescale.config.schema import DataConfig
from facescale.data.augment import NO_AUGMENT, Augment, augment_numpy
from facescale.data.bad_data import (
    BadSample,
    BadSampleError,
    SkipPolicy,
    check_image,
    check_label,
    read_index_lines,
)
from facescale.data.jpeg import decode_jpeg
from facescale.data.loader import Batch, TrainLoader, normalize_batch, steps_per_epoch, stream_seed
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT, decode_label

Segment = tuple[int, int, int]  # (shard number, first sample position, end position)
_ORDER, _SHUFFLE, _MIRROR, _AUGMENT = 11, 12, 13, 14
_AGAIN = BadSample("", "", -1, "marks the start of a refill pass over the worker's range")


def worker_share(total: int, workers: int, worker: int) -> int:
    """How many of `total` batches worker `worker` of `workers` produces; the shares sum to `total`."""
    return total // workers + (1 if worker < total % workers else 0)


def epoch_plan(shard_sizes: list[int], *, epoch: int, seed: int, rank: int, world_size: int, steps: int,
               batch_size: int, num_workers: int) -> list[list[Segment]]:
    """Per worker of `rank`: the (shard, first, end) sample ranges it reads in `epoch`."""
    order = np.random.default_rng(stream_seed(seed, _ORDER, epoch)).permutation(len(shard_sizes)).tolist()
    total = sum(shard_sizes)
    start, end = total * rank // world_size, total * (rank + 1) // world_size
    spare = (end - start) - steps * batch_size
    lengths = [worker_share(steps, num_workers, w) * batch_size + worker_share(spare, num_workers, w)
               for w in range(num_workers)]
    plans, cursor = [], start
    for length in lengths:
        plans.append(_segments(shard_sizes, order, cursor, cursor + length))
        cursor += length
    return plans


def _segments(sizes: list[int], order: list[int], first: int, end: int) -> list[Segment]:
    """The global range [first, end) of the shard order `order` as per-shard position ranges."""
    segments, offset = [], 0
    for shard in order:
        lo, hi = max(first, offset), min(end, offset + sizes[shard])
        if lo < hi:
            segments.append((shard, lo - offset, hi - offset))
        offset += sizes[shard]
    return segments


def read_segment(url: str, first: int, end: int) -> Iterator[dict[str, Any] | BadSample]:
    """Samples `first..end-1` of one tar as {__key__, __url__, jpg?, lbl?}, or a BadSample per lost sample.

    With the shard's `.idx` the members are read by offset (one `os.pread` per sample: parsing tar headers
    in Python costs more than decoding the JPEG); without it, webdataset's tar iterator reads the stream.
    """
    index = Path(url).with_suffix(".idx")
    if index.is_file():
        yield from _read_indexed(url, index, first, end)
    else:
        yield from _read_stream(url, first, end)


def _read_indexed(url: str, index: Path, first: int, end: int) -> Iterator[dict[str, Any] | BadSample]:
    samples = list(read_index_lines(index))
    fd = os.open(url, os.O_RDONLY)
    try:
        for position in range(first, end):
            if position >= len(samples):
                yield BadSample(url, f"#{position}", position,
                                "sample counted in manifest.json is not in the tar's index")
                continue
            sample = samples[position]
            lo = min(offset for offset, _ in sample.members.values())
            hi = max(offset + size for offset, size in sample.members.values())
            span = os.pread(fd, hi - lo, lo)
            if len(span) < hi - lo:
                yield BadSample(url, sample.key, position, f"member ends at byte {hi}, past the end of "
                                f"the tar ({lo + len(span)} B): the shard is truncated")
                continue
            current: dict[str, Any] = {"__key__": sample.key, "__url__": url}
            for ext, (offset, size) in sample.members.items():
                current[ext] = span[offset - lo:offset - lo + size]
            yield current
    finally:
        os.close(fd)


def _read_stream(url: str, first: int, end: int) -> Iterator[dict[str, Any] | BadSample]:
    position, current = -1, None
    try:
        with open(url, "rb") as stream:
            for member in tar_file_iterator(stream):
                key, _, ext = member["fname"].partition(".")
                if current is None or key != current["__key__"]:
                    if current is not None and position >= first:
                        yield current
                    position += 1
                    if position >= end:
                        return
                    current = {"__key__": key, "__url__": url}
                current[ext] = member["data"]
    except (tarfile.TarError, OSError, ValueError) as error:
        whole = current is not None and IMAGE_EXT in current and LABEL_EXT in current
        if whole and first <= position < end:
            yield current  # the last sample read was whole; the stream broke after it
        keys = _index_keys(url)
        for missing in range(max(position + 1 if whole else max(position, 0), first), end):
            key = keys[missing] if missing < len(keys) else f"#{missing}"
            yield BadSample(url, key, missing,
                            f"the tar does not read to the end ({error}): truncated or damaged")
        return
    if current is not None and first <= position < end:
        yield current
    keys = _index_keys(url) if position + 1 < end else []
    for missing in range(max(position + 1, first), end):
        key = keys[missing] if missing < len(keys) else f"#{missing}"
        yield BadSample(url, key, missing, "sample counted in manifest.json is not in the tar")


def _index_keys(url: str) -> list[str]:
    """Sample keys from the shard's `.idx` when there is one (to name samples lost in a damaged tar)."""
    index = Path(url).with_suffix(".idx")
    try:
        return [sample.key for sample in read_index_lines(index)] if index.is_file() else []
    except ValueError:
        return []


def decode_sample(sample: dict[str, Any], image_size: int, num_classes: int, out: np.ndarray | None = None,
                  decoder: str = "auto") -> tuple[np.ndarray, int] | str:
    """A `{jpg, lbl}` tar sample as (HWC uint8 RGB, label), or the reason it is bad; decodes into `out`."""
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in sample:
            return f"missing .{ext} member"
    try:
        label = decode_label(sample[LABEL_EXT])
    except ValueError as error:
        return str(error)
    reason = check_label(label, num_classes)
    if reason:
        return reason
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
                 policy: SkipPolicy, augment: Augment = NO_AUGMENT, decoder: str = "auto") -> None:
        super().__init__()
        self.urls, self.shard_sizes, self.rank, self.world_size = urls, shard_sizes, rank, world_size
        self.seed, self.start_epoch, self.start_step = seed, start_epoch, start_step
        self.batch_size, self.steps, self.num_workers = batch_size, steps, max(1, num_workers)
        self.shuffle_buffer, self.mirror, self.image_size = shuffle_buffer, mirror, image_size
        self.num_classes, self.policy, self.augment, self.decoder = num_classes, policy, augment, decoder
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
        segments = epoch_plan(self.shard_sizes, epoch=epoch, seed=self.seed, rank=self.rank,
                              world_size=self.world_size, steps=self.steps, batch_size=self.batch_size,
                              num_workers=self.num_workers)[worker]
        own_skip = skip // self.num_workers + (1 if worker < skip % self.num_workers else 0)
        share = worker_share(self.steps, self.num_workers, worker)
        batches = self._batches(segments, epoch, worker)
        for number in range(share):
            batch = next(batches)
            if number >= own_skip:
                yield batch

    def _samples(self, segments: list[Segment], epoch: int,
                 worker: int) -> Iterator[dict[str, Any] | BadSample]:
        """The worker's range shuffled in a seeded buffer, then again (reshuffled) for as long as needed."""
        for cycle in range(1 << 30):
            stream = (s for shard, first, end in segments for s in read_segment(self.urls[shard], first, end))
            good = 0
            if cycle:
                yield _AGAIN  # bad samples from here on were counted in the first pass
            buffer = shuffle(self.shuffle_buffer, self.shuffle_buffer,
                             seed=stream_seed(self.seed, _SHUFFLE, epoch, self.rank, worker, cycle))
            for sample in buffer(stream):
                good += not isinstance(sample, BadSample)
                yield sample
            if not good:
                raise BadSampleError(f"rank {self.rank} worker {worker}: no good sample in its part of epoch "
                                     f"{epoch} ({segments}); run `facescale validate` on the shards")

    def _new_batch(self) -> torch.Tensor:
        """An empty uint8 [B, H, W, 3] batch; in a worker it lives in shared memory, so the DataLoader hands
        the parent a handle instead of copying it."""
        images = torch.empty((self.batch_size, self.image_size, self.image_size, 3), dtype=torch.uint8)
        return images.share_memory_() if get_worker_info() is not None else images

    def _batches(self, segments: list[Segment], epoch: int,
                 worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Decode straight into the batch; mirror in place with torch (a reversed numpy copy is 5x slower)."""
        flips = np.random.default_rng(stream_seed(self.seed, _MIRROR, epoch, self.rank, worker))
        draws = np.random.default_rng(stream_seed(self.seed, _AUGMENT, epoch, self.rank, worker))
        images = self._new_batch()
        pixels = images.numpy()
        labels = np.empty(self.batch_size, np.int64)
        filled = skipped = 0
        repeat = False
        for sample in self._samples(segments, epoch, worker):
            if sample is _AGAIN:
                repeat = True
                continue
            slot = pixels[filled]
            decoded = decode_sample(sample, self.image_size, self.num_classes, slot, self.decoder) \
                if not isinstance(sample, BadSample) else sample.reason
            if isinstance(decoded, str):
                where = sample if isinstance(sample, BadSample) else \
                    BadSample(sample["__url__"], sample["__key__"], -1, decoded)
                if not repeat:
                    self.policy.reject(where)
                    skipped += 1
                continue
            image, labels[filled] = decoded
            if self.augment.active:
                slot[...] = augment_numpy(image, self.augment, draws)
            elif image is not slot:
                slot[...] = image
            if self.mirror and flips.random() < 0.5:
                images[filled].copy_(images[filled].flip(1))
            filled += 1
            if filled == self.batch_size:
                yield images, torch.from_numpy(labels.copy()), skipped
                images = self._new_batch()
                pixels = images.numpy()
                filled = skipped = 0


def _one_thread_worker(worker_id: int) -> None:
    """DataLoader worker init: one intra-op thread (tiny tensors; OpenMP spinning costs ~10x here)."""
    torch.set_num_threads(1)


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
                             augment=Augment.from_config(self.cfg), decoder=self.cfg.jpeg_decoder)
        workers = self.cfg.num_workers
        # spawn, not fork: a worker forked while another thread (DALI, gloo, a queue feeder) holds a lock can
        # deadlock waiting for its first index (seen once in the test suite)
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          multiprocessing_context="spawn" if workers else None,
                          worker_init_fn=_one_thread_worker, pin_memory=self.device.type == "cuda",
                          prefetch_factor=2 if workers else None)

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
