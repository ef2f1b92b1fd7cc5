"""The DALI training reader: `fn.readers.webdataset` over the indexed shards, JPEG decode, mirror, normalise.

DALI splits the concatenated sample list of all shards evenly by sample count (`shard_id`, `num_shards`)
and pads each rank's part (`pad_last_batch`); the iterator drops partial batches and we stop every rank
after `steps_per_epoch` batches, so ranks see equal batch counts. Each epoch runs on a fresh pipeline
seeded by (seed, rank, epoch) whose `shard_id` is `(rank + epoch) % world` — the same rotation DALI does
between epochs by itself — so an epoch does not depend on earlier ones and can be rebuilt on resume. The
next epoch's pipeline is built and starts decoding on a helper thread while the last batches of the current
one train (what one long-lived DALI pipeline does with its prefetch queue), so an epoch boundary does not
pay the start-up (build, shuffle-buffer fill, first batches) in the open.
The pipelines run DALI's dynamic executor: the iterator hands out its buffers as torch tensors (DLPack)
instead of copying every batch, and a buffer stays valid for as long as a tensor refers to it.
Decoding runs on the GPU ("mixed") when the model is on CUDA and on CPU threads (a CUDA-free pipeline,
`device_id=None`) otherwise.

Bad data: DALI's decoder turns most corrupt JPEGs into garbage images without an error, and a failing
pipeline does not say which sample broke it. So the shards are scanned at start-up with the webdataset
reader's own per-sample check (`facescale.data.shard_scan`: one JPEG decode per sample, ~0.1 ms per image
per core, split over the ranks and cached per shard): under `on_bad_sample: error` the first bad sample
stops the run naming shard and key; under `skip` DALI reads filtered `.idx` files that leave the bad
samples out. A pipeline failure during training is still diagnosed by a scan that names the sample.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from facescale.config.schema import DataConfig
from facescale.data.augment import NO_AUGMENT, Augment, augment_dali
from facescale.data.bad_data import (
    RESCAN_FIX,
    BadSample,
    BadSampleError,
    SkipPolicy,
    read_index_lines,
    scan_shard,
)
from facescale.data.hang_guard import hang_limit
from facescale.data.manifest import Manifest
from facescale.data.shard_scan import bad_positions, scan_shards
from facescale.data.shard_writer import IMAGE_EXT, INDEX_VERSION, LABEL_EXT
from facescale.data.train_loader import Batch, TrainLoader, normalize_batch, steps_per_epoch, stream_seed

READER_NAME = "Reader"
OPEN_AHEAD_BATCHES = 3  # start the next epoch's pipeline this many batches before the end of the current one


def build_pipeline(tar_paths: list[str], index_paths: list[str], *, shard_id: int, world_size: int,
                   batch_size: int, num_threads: int, device_id: int | None, seed: int, shuffle_buffer: int,
                   mirror: bool, random_shuffle: bool = True, augment: Augment = NO_AUGMENT) -> Pipeline:
    """A built DALI pipeline giving ("images" uint8 HWC RGB, augmented and mirrored; "labels" int32 [1]).

    The normalisation to CHW float is `normalize_batch` on the model's device: as a DALI CPU operator
    (crop_mirror_normalize) it cost more than the JPEG decode itself.
    """
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=2, exec_dynamic=True)
    with pipe:
        # dont_use_mmap: plain reads, as DALI advises for network file systems (where a cluster keeps its data
        # sets); a shard cut or rewritten in place under a mapped read killed the process with SIGBUS, no
        # message and nothing saved, where a read error names the shard. Cost on a local page-cached set: the
        # CPU reader 2-7% slower (benchmarks/results/dali_mmap_ab.md; not the demo's bottleneck).
        jpegs, labels = fn.readers.webdataset(
            paths=tar_paths, index_paths=index_paths, ext=[IMAGE_EXT, LABEL_EXT],
            dtypes=[types.UINT8, types.INT32], missing_component_behavior="error", shard_id=shard_id,
            num_shards=world_size, random_shuffle=random_shuffle, initial_fill=max(1, shuffle_buffer),
            pad_last_batch=True, dont_use_mmap=True, name=READER_NAME)
        decode_device = "cpu" if device_id is None else "mixed"
        images = augment_dali(fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB), augment)
        if mirror:
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def scan_all(manifest: Manifest, decode: bool = True) -> list[BadSample]:
    """Every bad sample of the shard directory (see `facescale.data.bad_data`), its shard named as
    manifest.json names it (as `scan_shards` does)."""
    bad: list[BadSample] = []
    for info, tar, index in zip(manifest.shards, manifest.shard_paths(), manifest.index_paths(), strict=True):
        bad += [replace(b, shard=info.name) for b in scan_shard(
            tar, index, num_classes=manifest.num_classes, image_size=manifest.image_size, decode=decode)[0]]
    return bad


def write_filtered_indexes(manifest: Manifest, bad: list[BadSample],
                           out_dir: Path) -> tuple[list[str], list[str], int]:
    """Copies of the `.idx` files without the bad samples' lines, named by shard number (file names may
    repeat in subfolders); returns (tar paths, index paths, samples kept). A shard with no good sample is
    left out: DALI refuses an index of none."""
    drop = bad_positions(manifest, bad)
    tars, paths, kept = [], [], 0
    pairs = zip(manifest.shard_paths(), manifest.index_paths(), strict=True)
    for number, (tar, index) in enumerate(pairs):
        lines = [s.line for s in read_index_lines(index) if s.position not in drop[number]]
        if not lines:
            continue
        path = out_dir / f"{number:06d}-{index.name}"
        path.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(f"{line}\n" for line in lines))
        tars.append(str(tar))
        paths.append(str(path))
        kept += len(lines)
    return tars, paths, kept


class DaliTrainLoader(TrainLoader):
    """TrainLoader over one DALI pipeline per epoch, each cut to exactly `steps_per_epoch` batches."""

    skipped_is_per_set = True  # the scan's bad samples, left out up front: a resume does not add saved ones

    def __init__(self, manifest: Manifest, data_cfg: DataConfig, *, rank: int, world_size: int,
                 batch_size: int, seed: int, device: torch.device, epoch: int = 0,
                 hang_limit_s: float = 0.0) -> None:
        """`hang_limit_s` (> 0): a pipeline build that blocks longer (opening files on storage that hangs,
        with the GIL held) ends the process (data/hang_guard.py)."""
        self.manifest, self.cfg = manifest, data_cfg
        self.hang_limit_s = hang_limit_s
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.policy = SkipPolicy(data_cfg.on_bad_sample, data_cfg.max_skip_fraction)
        self.epoch, self.step_in_epoch, self.seen = epoch, 0, 0
        self.device = torch.device(device)
        self.device_id = None
        if self.device.type == "cuda":
            index = self.device.index
            self.device_id = index if index is not None else torch.cuda.current_device()
        self.tar_paths = [str(p) for p in manifest.shard_paths()]
        self.index_paths = [str(p) for p in manifest.index_paths()]
        num_samples = manifest.num_samples
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        bad = scan_shards(manifest, world_size)  # DALI decodes most corrupt JPEGs into garbage silently
        self._left_out = {(b.shard, b.position) for b in bad}  # under skip; a later failure is another one
        if bad:
            try:  # every rank holds the same scan: each raises alike, rank 0 prints
                self.policy.reject(bad[0])  # under "error": stop here, naming the shard and key
                self.policy.check_budget(len(bad), manifest.num_samples, str(manifest.directory))
            except BadSampleError as exc:
                exc.every_rank = True
                raise
            self._scratch = tempfile.TemporaryDirectory(prefix="facescale-idx-")
            scratch = Path(self._scratch.name)
            self.tar_paths, self.index_paths, num_samples = write_filtered_indexes(manifest, bad, scratch)
            # this rank's share of the set's bad samples (left out of every epoch); the trainer sums them
            self.policy.skipped = len(bad) * (rank + 1) // world_size - len(bad) * rank // world_size
        self.steps_per_epoch = steps_per_epoch(num_samples, world_size, batch_size,
                                               source=str(manifest.directory))
        self._opener: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[DALIGenericIterator]] | None = None

    def open_epoch(self, epoch: int) -> DALIGenericIterator:
        """An iterator over a fresh pipeline for `epoch` (it has decoded its first batch when returned)."""
        with hang_limit(self.hang_limit_s):
            return self._open_epoch(epoch)

    def _open_epoch(self, epoch: int) -> DALIGenericIterator:
        pipeline = build_pipeline(self.tar_paths, self.index_paths,
                                  shard_id=(self.rank + epoch) % self.world_size,
                                  world_size=self.world_size, batch_size=self.batch_size,
                                  num_threads=self.cfg.dali_threads, device_id=self.device_id,
                                  seed=stream_seed(self.seed, self.rank, epoch),
                                  shuffle_buffer=self.cfg.shuffle_buffer, mirror=self.cfg.random_mirror,
                                  augment=Augment.from_config(self.cfg))
        return DALIGenericIterator([pipeline], ["images", "labels"], reader_name=READER_NAME,
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)

    def epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """Batches `skip`.. of `epoch` (images on the model's device, labels int64)."""
        try:
            batches = self._take_opened(epoch) if skip == 0 else None
            batches = batches or self.open_epoch(epoch)
            for step, outputs in enumerate(batches):
                if step >= self.steps_per_epoch:  # DALI may give a batch more (its padding); drop it
                    break
                labels = outputs[0]["labels"].view(-1).to(torch.int64)
                if bool(((labels < 0) | (labels >= self.manifest.num_classes)).any()):
                    raise BadSampleError("a label outside the manifest's class range")
                last = step == self.steps_per_epoch - 1
                if step == max(0, self.steps_per_epoch - OPEN_AHEAD_BATCHES):
                    self._open_ahead(epoch + 1)
                if step >= skip:
                    yield normalize_batch(outputs[0]["images"], self.device), labels.to(self.device)
                if last:
                    return
        except RuntimeError as error:
            raise self._diagnose(error) from error

    def _open_ahead(self, epoch: int) -> None:
        """Start building `epoch`'s pipeline on the helper thread."""
        self.reset()
        if self._opener is None:
            self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facescale-dali-open")
        self._ahead = (epoch, self._opener.submit(self.open_epoch, epoch))

    def _take_opened(self, epoch: int) -> DALIGenericIterator | None:
        """The iterator opened ahead for `epoch`, if any (its build errors are raised here)."""
        if self._ahead is None or self._ahead[0] != epoch:
            self.reset()
            return None
        ahead, self._ahead = self._ahead, None
        return ahead[1].result()

    def reset(self) -> None:
        """Drop an iterator opened ahead, after waiting for its build (not torn down mid-build)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].exception()  # waits for the build; its errors belong to an epoch no longer wanted

    def _diagnose(self, error: BaseException) -> BaseException:
        """Turn a dead pipeline's error into one naming the bad sample (found by scanning the shards); under
        skip it went bad after the start-up scan (a shard cut or rewritten), and a new run's scan skips it."""
        bad = [b for b in scan_all(self.manifest) if (b.shard, b.position) not in self._left_out]
        if not bad:
            return error
        fix = RESCAN_FIX if self.policy.policy == "skip" else \
            "`facescale validate DIR` lists all of them; repair the shards or set data.on_bad_sample=skip"
        return BadSampleError(f"bad training sample: {bad[0]} (DALI: {str(error).strip().splitlines()[-1]})",
                              fix=fix)
