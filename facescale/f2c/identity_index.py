"""Identity-indexed access to the shards: label -> the (shard, offset, size) of each of its JPEGs.

Built from the DALI `.idx` files (member offsets) and the 4-byte `.lbl` members read with `os.pread`; the
images are then read the same way, with no tar parsing. Stored as CSR arrays sorted by label: `starts`
[C + 1] and per-image `shard`, `offset`, `size` — the only structure of the DCP mode whose size grows with
the number of identities C.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facescale.data.manifest import Manifest
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT, decode_label


def parse_index_line(line: str, where: str) -> dict[str, tuple[int, int]]:
    """One `.idx` sample line (`ext offset size name` per member) as {ext: (offset, size)}."""
    parts = line.split()
    if not parts or len(parts) % 4:
        raise ValueError(
            f"{where}: expected groups of 'ext offset size name', got {line.strip()!r}; "
            "recreate the index with facescale.data.shard_writer.index_tar"
        )
    return {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}


@dataclass
class IdentityIndex:
    """CSR index of the images of every identity; `images_of(label)` gives rows of shard/offset/size."""

    shard_paths: list[Path]
    starts: np.ndarray  # int64 [C + 1]
    shard: np.ndarray  # int32 [N]
    offset: np.ndarray  # int64 [N]
    size: np.ndarray  # int64 [N]

    @property
    def num_classes(self) -> int:
        return len(self.starts) - 1

    def counts(self) -> np.ndarray:
        """Images per identity [C]."""
        return np.diff(self.starts)

    def images_of(self, label: int) -> range:
        """Row numbers (into shard/offset/size) of the images of `label`."""
        return range(int(self.starts[label]), int(self.starts[label + 1]))

    @classmethod
    def build(cls, manifest: Manifest) -> IdentityIndex:
        """Read every shard's `.idx` and labels; raises ValueError naming the shard on bad entries."""
        shard_ids, offsets, sizes, labels = [], [], [], []
        for number, (tar, index) in enumerate(
            zip(manifest.shard_paths(), manifest.index_paths(), strict=True)
        ):
            if not index.is_file():
                raise FileNotFoundError(
                    f"{index} (DALI index) is missing; the DCP identity loader needs it. "
                    "Recreate it with facescale.data.shard_writer.index_tar"
                )
            lines = index.read_text().splitlines()[1:]
            fd = os.open(tar, os.O_RDONLY)
            try:
                for line_no, line in enumerate(lines, start=2):
                    members = parse_index_line(line, f"{index}:{line_no}")
                    if IMAGE_EXT not in members or LABEL_EXT not in members:
                        raise ValueError(f"{index}:{line_no}: sample lacks .{IMAGE_EXT} or .{LABEL_EXT}")
                    label_offset, label_size = members[LABEL_EXT]
                    label = decode_label(os.pread(fd, label_size, label_offset))
                    if not 0 <= label < manifest.num_classes:
                        raise ValueError(
                            f"{tar}: sample at line {line_no} of {index.name} has label {label}, "
                            f"outside [0, {manifest.num_classes}) of manifest.json"
                        )
                    shard_ids.append(number)
                    offsets.append(members[IMAGE_EXT][0])
                    sizes.append(members[IMAGE_EXT][1])
                    labels.append(label)
            finally:
                os.close(fd)
        label_arr = np.asarray(labels, dtype=np.int64)
        order = np.argsort(label_arr, kind="stable")
        starts = np.zeros(manifest.num_classes + 1, dtype=np.int64)
        np.cumsum(np.bincount(label_arr, minlength=manifest.num_classes), out=starts[1:])
        return cls(
            shard_paths=list(manifest.shard_paths()),
            starts=starts,
            shard=np.asarray(shard_ids, dtype=np.int32)[order],
            offset=np.asarray(offsets, dtype=np.int64)[order],
            size=np.asarray(sizes, dtype=np.int64)[order],
        )


class ImageReader:
    """Reads JPEG bytes of index rows with `os.pread` on file descriptors opened once per process."""

    def __init__(self, index: IdentityIndex) -> None:
        self.index = index
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, row: int) -> bytes:
        """The JPEG bytes of image row `row`."""
        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own descriptors
            self._fds, self._pid = {}, os.getpid()
        shard = int(self.index.shard[row])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.index.shard_paths[shard], os.O_RDONLY)
        return os.pread(fd, int(self.index.size[row]), int(self.index.offset[row]))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
