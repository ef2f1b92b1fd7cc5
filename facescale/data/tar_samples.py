"""Where a webdataset-reader worker's samples come from: the per-epoch plan of sample ranges (exact epochs),
or whole shards drawn with replacement (resampled), read from the tars as `{__key__, __url__, jpg, lbl}`.

Epoch `e` is planned from (seed, e) alone: the shards are put in a seeded order, the concatenated sample list
is split into `world` contiguous parts by sample count (like DALI), and each rank's part is split over its
workers in proportion to the batches each worker yields. A sample that cannot be read comes out as a
`BadSample` naming the shard, key and reason, never as an exception, so the reader's policy decides.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.shardlists import ResampledShards
from webdataset.tariterators import tar_file_iterator

from facescale.data.bad_data import BadSample, IndexedSample, read_index_lines
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT
from facescale.data.train_loader import stream_seed

Segment = tuple[int, int, int]  # (shard number, first sample position, end position)
_ORDER = 11  # stream_seed salt; the webdataset reader's own salts are 12..15


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

    With the shard's `.idx` the members are read by offset (one `os.pread` per run of consecutive samples:
    parsing tar headers in Python costs more than decoding the JPEG); without it, webdataset's tar iterator
    reads the stream.
    """
    index = Path(url).with_suffix(".idx")
    if index.is_file():
        yield from _read_indexed(url, index, first, end)
    else:
        yield from _read_stream(url, first, end)


def resampled_samples(urls: list[str], shard_sizes: list[int],
                      seed: int) -> Iterator[dict[str, Any] | BadSample]:
    """An endless stream of whole shards drawn with replacement by webdataset's ResampledShards (seeded)."""
    sizes = dict(zip(urls, shard_sizes, strict=True))
    shards = ResampledShards(urls, worker_seed=lambda: seed, deterministic=True)
    for item in shards:
        yield from read_segment(item["url"], 0, sizes[item["url"]])


READ_CHUNK_BYTES = 4 << 20  # consecutive samples are read with one pread of up to this many bytes


def _extent(sample: IndexedSample) -> tuple[int, int]:
    """First and end byte of a sample's members in its tar."""
    return (min(offset for offset, _ in sample.members.values()),
            max(offset + size for offset, size in sample.members.values()))


def _read_indexed(url: str, index: Path, first: int, end: int) -> Iterator[dict[str, Any] | BadSample]:
    """Samples by their `.idx` offsets, read in chunks of consecutive samples: one `os.pread` per
    READ_CHUNK_BYTES instead of one per sample (far fewer requests on a cluster file system)."""
    samples = list(read_index_lines(index))
    extents = {p: _extent(samples[p]) for p in range(first, min(end, len(samples)))}
    try:
        fd = os.open(url, os.O_RDONLY)
    except OSError as error:  # deleted or moved since the start (its .idx kept), or unreadable
        yield from _unreadable(url, samples, first, end, error)
        return
    try:
        tar_size = os.fstat(fd).st_size  # reads stop there: a damaged .idx line cannot ask for any length
        position = first
        while position < end:
            if position >= len(samples):
                yield BadSample(url, f"#{position}", position,
                                "sample counted in manifest.json is not in the tar's index")
                position += 1
                continue
            base, stop = extents[position][0], position + 1
            while stop in extents and extents[stop][1] - base <= READ_CHUNK_BYTES:
                stop += 1
            length = min(extents[stop - 1][1], tar_size) - base
            try:
                span = os.pread(fd, length, base) if length > 0 else b""
            except OSError as error:
                yield from _unreadable(url, samples, position, end, error)
                return
            for sample in samples[position:stop]:
                hi = extents[sample.position][1]
                if hi - base > len(span):
                    yield BadSample(url, sample.key, sample.position, f"member ends at byte {hi}, past the "
                                    f"end of the tar ({base + len(span)} B): the shard is truncated")
                    continue
                current: dict[str, Any] = {"__key__": sample.key, "__url__": url}
                for ext, (offset, size) in sample.members.items():
                    current[ext] = span[offset - base:offset - base + size]
                yield current
            position = stop
    finally:
        os.close(fd)


def _unreadable(url: str, samples: list[IndexedSample], first: int, end: int,
                error: OSError) -> Iterator[BadSample]:
    """A BadSample naming the tar for each of samples `first..end-1`, which it failed to read."""
    for position in range(first, end):
        key = samples[position].key if position < len(samples) else f"#{position}"
        yield BadSample(url, key, position, f"the tar cannot be read ({error.strerror or error})")


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
