"""Identity-indexed access to the shards: label -> where each of its JPEGs lies, read with `os.pread`.

For loaders that draw images by identity (F2C's identity loader) rather than stream the shards:

    index = IdentityIndex.build("data/shards")      # reads every .idx and each 4-byte .lbl member
    locations = index.locations(label)              # list[SampleLocation(tar, offset, size)]
    jpegs = index.sample(label, k, rng)             # k JPEG byte strings of `label` (numpy Generator rng)
    jpeg = index.read_jpeg(locations[0])            # bytes of one image

`sample` draws without replacement when the identity has at least k images, with replacement otherwise.
The index costs 20 bytes per image (CSR arrays sorted by label); building it reads one 4-byte label per
image. File descriptors are opened lazily per process, so an index can be shared with forked workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facescale.data.bad_data import BadSample, BadSampleError, read_index_lines
from facescale.data.manifest import Manifest, ManifestError
from facescale.data.shard_scan import bad_positions
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT, decode_label


@dataclass(frozen=True)
class SampleLocation:
    """Where one JPEG lies: the tar file, the byte offset of its data and its size in bytes."""

    tar: Path
    offset: int
    size: int


class IdentityIndex:
    """label -> sample locations of a shard directory, as CSR arrays (`starts` [C + 1], per-image columns)."""

    def __init__(self, tars: list[Path], starts: np.ndarray, shard: np.ndarray, offset: np.ndarray,
                 size: np.ndarray) -> None:
        self.tars, self.starts, self.shard, self.offset, self.size = tars, starts, shard, offset, size
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()

    @property
    def num_classes(self) -> int:
        """Number of identities (the manifest's num_classes)."""
        return len(self.starts) - 1

    def count(self, label: int) -> int:
        """Images of identity `label`."""
        return int(self.starts[label + 1] - self.starts[label])

    @classmethod
    def build(cls, directory: str | Path, leave_out: list[BadSample] | None = None) -> IdentityIndex:
        """Index `directory` (manifest.json, tars, .idx files); a ManifestError names bad entries. The samples
        in `leave_out` (under data.on_bad_sample=skip: the start-up scan's, `shard_scan.scan_shards`) are
        not indexed."""
        manifest = Manifest.load(directory)
        dropped = bad_positions(manifest, leave_out or [])
        shards, offsets, sizes, labels = [], [], [], []
        pairs = zip(manifest.shard_paths(), manifest.index_paths(), strict=True)
        for number, (tar, index) in enumerate(pairs):
            if not index.is_file():
                raise FileNotFoundError(f"{index} is missing; identity access needs the .idx files "
                                        "(recreate with facescale.data.shard_writer.index_tar)")
            fd = os.open(tar, os.O_RDONLY)
            try:
                for sample in read_index_lines(index):
                    if sample.position in dropped[number]:
                        continue
                    missing = [ext for ext in (IMAGE_EXT, LABEL_EXT) if ext not in sample.members]
                    if missing:
                        raise ManifestError(f"{tar.name}: sample {sample.key!r}: missing .{missing[0]}; run "
                                            "`facescale validate`")
                    label_offset, label_size = sample.members[LABEL_EXT]
                    payload = os.pread(fd, label_size, label_offset)
                    try:
                        label = decode_label(payload)
                    except ValueError as exc:
                        truncated = len(payload) < label_size
                        raise ManifestError(f"{tar.name}: sample {sample.key!r}: "
                                            f"{'the shard is truncated' if truncated else exc}; run "
                                            "`facescale validate`") from None
                    if not 0 <= label < manifest.num_classes:
                        raise ManifestError(f"{tar.name}: sample {sample.key!r} has label {label} outside "
                                            f"[0, {manifest.num_classes}); run `facescale validate`")
                    shards.append(number)
                    offsets.append(sample.members[IMAGE_EXT][0])
                    sizes.append(sample.members[IMAGE_EXT][1])
                    labels.append(label)
            finally:
                os.close(fd)
        label_array = np.asarray(labels, dtype=np.int64)
        order = np.argsort(label_array, kind="stable")
        starts = np.zeros(manifest.num_classes + 1, dtype=np.int64)
        np.cumsum(np.bincount(label_array, minlength=manifest.num_classes), out=starts[1:])
        return cls(manifest.shard_paths(), starts, np.asarray(shards, np.int32)[order],
                   np.asarray(offsets, np.int64)[order], np.asarray(sizes, np.int32)[order])

    def locations(self, label: int) -> list[SampleLocation]:
        """The locations of every image of identity `label`, in shard order."""
        rows = range(int(self.starts[label]), int(self.starts[label + 1]))
        return [self._location(row) for row in rows]

    def _location(self, row: int) -> SampleLocation:
        return SampleLocation(self.tars[self.shard[row]], int(self.offset[row]), int(self.size[row]))

    def read_jpeg(self, location: SampleLocation) -> bytes:
        """The JPEG bytes at `location` (one `os.pread`; descriptors are cached per process)."""
        if self._pid != os.getpid():  # forked into a worker: the parent's descriptors are not ours to share
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(location.tar)
        if fd is None:
            fd = self._fds[location.tar] = os.open(location.tar, os.O_RDONLY)
        data = os.pread(fd, location.size, location.offset)
        if len(data) != location.size:
            raise BadSampleError(f"{location.tar}: {location.size} B at offset {location.offset} run past "
                                 "the end of the file (truncated shard); run `facescale validate`")
        return data

    def sample(self, label: int, k: int, rng: np.random.Generator) -> list[bytes]:
        """k JPEGs of identity `label`: distinct images if it has >= k, otherwise drawn with replacement."""
        count = self.count(label)
        if count == 0:
            raise ValueError(f"identity {label} has no images in the shards")
        picks = rng.choice(count, size=k, replace=count < k)
        first = int(self.starts[label])
        return [self.read_jpeg(self._location(first + pick)) for pick in picks.tolist()]

    def close(self) -> None:
        """Close the descriptors this process opened."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
