"""Bad training samples: what counts as bad, the shard scan that finds them, and the error/skip policy.

A sample is bad when its `.lbl` or `.jpg` member is missing, a member lies past the end of the tar (a
truncated shard), the label is not in [0, num_classes) or the JPEG does not decode to an image_size square.
`data.on_bad_sample = "error"` stops with the shard, key and reason; `"skip"` leaves the sample out, counts
it, and stops once more than `data.max_skip_fraction` of the samples a rank meets in an epoch were bad.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from facescale.config.schema import BadSamplePolicy, choices
from facescale.data.jpeg import decode_jpeg
from facescale.data.shard_writer import IMAGE_EXT, LABEL_EXT, decode_label
from facescale.errors import InputError

POLICIES = choices(BadSamplePolicy)


TRUNCATED_REASON = "past the end of the tar"  # in the reason of a sample that a cut shard lost


@dataclass(frozen=True)
class BadSample:
    """One bad sample: its shard file, key, position (sample line in the shard's index) and the reason."""

    shard: str
    key: str
    position: int
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: sample {self.key!r}: {self.reason}"


class BadSampleError(InputError, RuntimeError):
    """Raised under `on_bad_sample: error` (or when skipping exceeds the budget); names shard, key, reason."""


BAD_SAMPLE_FIX = ("repair or drop it (`facescale validate DIR` lists all of them), or set "
                  "data.on_bad_sample=skip")
# under skip, a sample found bad after the start-up scan (DALI reader, F2C identities) went bad during the run
RESCAN_FIX = ("the shards changed during the run; run the same command again to resume: its start-up scan "
              "leaves the bad samples out")


def check_label(label: int, num_classes: int) -> str | None:
    """The reason a label is bad, or None."""
    return None if 0 <= label < num_classes else f"label {label} outside [0, {num_classes}) of manifest.json"


def check_image(jpeg: bytes, image_size: int) -> str | None:
    """The reason JPEG bytes are bad (do not decode, wrong shape), or None."""
    try:
        shape = decode_jpeg(jpeg).shape
    except Exception as error:  # noqa: BLE001 - decoders raise assorted types
        return f"JPEG does not decode ({error})"
    return None if shape == (image_size, image_size, 3) else f"image is {shape}, expected {image_size}px RGB"


@dataclass(frozen=True)
class IndexedSample:
    """One line of a shard's `.idx`: position, key and {ext: (offset, size)} of its members."""

    position: int
    key: str
    members: dict[str, tuple[int, int]]
    line: str


def read_index_lines(index_path: str | Path) -> Iterator[IndexedSample]:
    """The samples listed in a DALI `.idx` (`ext offset size name` per member); ValueError on a bad line."""
    lines = Path(index_path).read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise ValueError(f"{index_path}: not a DALI webdataset index (first line 'v1.2 <count>'); "
                         "recreate it "
                         "with facescale.data.shard_writer.index_tar")
    for position, line in enumerate(lines[1:]):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{index_path}:{position + 2}: expected 'ext offset size name' groups")
        numbers = [parts[i + j] for i in range(0, len(parts), 4) for j in (1, 2)]
        if not all(number.isascii() and number.isdigit() for number in numbers):
            raise ValueError(f"{index_path}:{position + 2}: offsets and sizes must be non-negative integers")
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        yield IndexedSample(position, parts[3].split(".", 1)[0], members, line)


def scan_shard(tar_path: str | Path, index_path: str | Path, *, num_classes: int, image_size: int,
               decode: bool = True) -> tuple[list[BadSample], dict[int, int], int]:
    """(bad samples, label counts of the good ones, samples listed) of one shard, read through its index.

    Reads each `.lbl` (and with `decode`, each `.jpg`) with `os.pread`; costs one JPEG decode per sample.
    """
    tar_path = Path(tar_path)
    size = tar_path.stat().st_size
    bad: list[BadSample] = []
    counts: dict[int, int] = {}
    listed = 0
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        for sample in read_index_lines(index_path):
            listed += 1
            reason = _sample_problem(fd, size, sample, num_classes, image_size, decode, counts)
            if reason:
                bad.append(BadSample(tar_path.name, sample.key, sample.position, reason))
    finally:
        os.close(fd)
    return bad, counts, listed


def _sample_problem(fd: int, file_size: int, sample: IndexedSample, num_classes: int, image_size: int,
                    decode: bool, counts: dict[int, int]) -> str | None:
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in sample.members:
            return f"missing .{ext} member"
        offset, length = sample.members[ext]
        if offset + length > file_size:
            return (f".{ext} member ends at byte {offset + length}, {TRUNCATED_REASON} "
                    f"({file_size} B): the shard is truncated")
    offset, length = sample.members[LABEL_EXT]
    try:
        label = decode_label(os.pread(fd, length, offset))
    except ValueError as error:
        return str(error)
    reason = check_label(label, num_classes)
    if reason is None and decode:
        offset, length = sample.members[IMAGE_EXT]
        reason = check_image(os.pread(fd, length, offset), image_size)
    if reason is None:
        counts[label] = counts.get(label, 0) + 1
    return reason


class SkipPolicy:
    """Applies `on_bad_sample` to bad samples and keeps the counters the trainer logs (`skipped`, `seen`)."""

    def __init__(self, policy: str, max_skip_fraction: float) -> None:
        if policy not in POLICIES:
            raise ValueError(f"data.on_bad_sample must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.max_skip_fraction = policy, max_skip_fraction
        self.skipped = 0
        self.seen = 0

    def reject(self, sample: BadSample | str) -> None:
        """Handle one bad sample: raise under "error", otherwise count it."""
        if self.policy == "error":
            raise BadSampleError(f"bad training sample: {sample}", fix=BAD_SAMPLE_FIX)
        self.skipped += 1

    def check_budget(self, skipped: int, examined: int, where: str) -> None:
        """Stop when `skipped` of `examined` samples exceeds `max_skip_fraction`."""
        if examined and skipped > self.max_skip_fraction * examined:
            raise BadSampleError(f"{where}: {skipped} of {examined} samples were bad, more than "
                                 f"data.max_skip_fraction={self.max_skip_fraction}; run `facescale validate` "
                                 "on the shards and repair them")
