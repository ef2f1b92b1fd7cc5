"""Read insightface's MXNet RecordIO sets (`train.rec` + `train.idx`) without MXNet.

Format facts used here (MXNet `dmlc::RecordIOWriter`, `mx.recordio.pack`, insightface's dataset convention):

* a record is `uint32 magic 0xced7230a`, `uint32 lrecord` (little-endian), then `length` payload bytes padded
  with zeros to a multiple of 4; `cflag = lrecord >> 29`, `length = lrecord & (2**29 - 1)`. cflag 0 is a whole
  record; a payload that contained the magic word was split there into parts with cflag 1 (first), 2 (middle),
  3 (last), and joining the parts puts the magic word back between them;
* `train.idx` is text, one `key<TAB>byte offset of the record` per line;
* a payload starts with the 24-byte IRHeader `struct.pack('<IfQQ', flag, label, id, id2)`; when `flag > 0`,
  `flag` float32 labels follow the header (and `label` holds no value); the image bytes come after;
* insightface sets: record 0 is a header whose first two labels are `(first_identity_record, end)`; image
  records are 1 .. first_identity_record - 1, and identity records carry `(first_image, end_image)`. Without
  that header (flag 0, e.g. a shuffled rec), every record in the index is an image. An image's class is its
  label, or the first label of a multi-label header. An identity record has two labels and no image bytes.
* labels are float32, exact for integers up to 2**24 (16,777,216): above that (Glint360K's 17.1M images,
  a 42M-image WebFace42M .rec) the header's record numbers are rounded, so the boundary between image and
  identity records is found among the records within the rounding of the header's value.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from facescale.errors import InputError

RECORD_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")
_FLOAT32_EXACT = 1 << 24  # float32 holds every integer up to here


class RecordIOError(InputError, ValueError):
    """A `.rec`/`.idx` pair that breaks the RecordIO format; the message names the file and offset."""


@dataclass(frozen=True)
class ImageRecord:
    """One decoded record: the IRHeader fields, its labels (one or more) and the image bytes."""

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int
    image: bytes

    @property
    def class_label(self) -> int:
        """The class of an image record: its (first) label as an int."""
        return int(self.labels[0])


def read_index(idx_path: str | Path, rec_path: str | Path | None = None) -> dict[int, int]:
    """`train.idx` as {record key: byte offset}; raises RecordIOError naming the bad line. Read as bytes (the
    file is ASCII digits: a damaged, non-text file is a bad line, not a decode error); with `rec_path`, every
    offset must lie inside that `.rec`."""
    offsets: dict[int, int] = {}
    rec_size = None if rec_path is None else os.path.getsize(rec_path)
    with open(idx_path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():  # bytes: ASCII digits
                text = line.strip().decode("utf-8", "replace")
                raise RecordIOError(f"{idx_path}:{number}: expected 'key<TAB>offset', got {text!r}")
            key, offset = int(parts[0]), int(parts[1])
            if rec_size is not None and offset >= rec_size:
                raise RecordIOError(f"{idx_path}:{number}: offset {offset} of key {key} is past the end of "
                                    f"{rec_path} ({rec_size} B); the .idx does not belong to this .rec, or "
                                    "the .rec is truncated")
            offsets[key] = offset
    if not offsets:
        raise RecordIOError(f"{idx_path} lists no records; pass the .idx written with the .rec")
    return offsets


def read_payload(fd: int, offset: int, where: str) -> bytes:
    """The payload of the record starting at byte `offset` of the open `.rec` file `fd` (parts joined)."""
    parts: list[bytes] = []
    while True:
        head = os.pread(fd, 8, offset)
        if len(head) < 8:
            raise RecordIOError(f"{where}: record at offset {offset} runs past the end of the file")
        magic, lrecord = struct.unpack("<II", head)
        if magic != RECORD_MAGIC:
            raise RecordIOError(f"{where}: no RecordIO magic at offset {offset} (found {magic:#010x}); "
                                "the .idx does not belong to this .rec")
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        data = os.pread(fd, length, offset + 8)
        if len(data) < length:
            raise RecordIOError(f"{where}: record at offset {offset} is truncated "
                                f"({len(data)} of {length} B)")
        parts.append(data)
        if cflag in (0, 3):
            if cflag == 0 and len(parts) > 1:
                raise RecordIOError(f"{where}: whole record inside a split record at offset {offset}")
            return _MAGIC_BYTES.join(parts)
        offset += 8 + length + (-length % 4)


def unpack_record(payload: bytes, where: str) -> ImageRecord:
    """Split a payload into its IRHeader, labels and image bytes."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOError(f"{where}: payload of {len(payload)} B is shorter than the 24-byte IRHeader")
    flag, label, record_id, id2 = IR_HEADER.unpack_from(payload)
    body = payload[IR_HEADER.size:]
    if flag == 0:
        return ImageRecord(0, (label,), record_id, id2, body)
    if len(body) < 4 * flag:
        raise RecordIOError(f"{where}: header announces {flag} labels but the payload is too short")
    labels = struct.unpack_from(f"<{flag}f", body)
    return ImageRecord(flag, tuple(labels), record_id, id2, body[4 * flag:])


class RecordFile:
    """Random access to the records of a `.rec` by key (via its `.idx`); re-opens itself after a fork."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"{self.rec_path} not found; pass --rec the insightface train.rec")
        if not self.idx_path.is_file():
            raise RecordIOError(f"{self.idx_path} not found: the .rec is read through the .idx written "
                                "with it (insightface ships train.idx beside train.rec); copy it there or "
                                "pass --idx")
        self.offsets = read_index(self.idx_path, self.rec_path)
        self._fd: int | None = None
        self._pid = -1

    def read(self, key: int) -> ImageRecord:
        """The record stored under `key`."""
        if key not in self.offsets:
            raise RecordIOError(f"{self.idx_path}: no record with key {key}")
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        where = f"{self.rec_path} (key {key})"
        return unpack_record(read_payload(self._fd, self.offsets[key], where), where)

    def image_keys(self) -> list[int]:
        """Keys of the image records: 1 .. first identity record - 1 under an insightface header, else all."""
        keys, identities = sorted(self.offsets), self.identity_range
        if identities is None:
            return keys
        return [key for key in keys if 0 < key < identities[0]]

    def identity_count(self) -> int | None:
        """How many identity records the insightface header announces, or None without such a header."""
        identities = self.identity_range
        return None if identities is None else identities[1] - identities[0]

    @functools.cached_property
    def identity_range(self) -> tuple[int, int] | None:
        """(first identity record, end) of an insightface header record 0, or None: the set has none. Read
        once (near the boundary of a 42M-record set it reads a few records more)."""
        first_key = min(self.offsets)  # not a sort of every key: the index may list 42M
        header = self.read(first_key)
        if not (first_key == 0 and header.flag > 0 and len(header.labels) >= 2):
            return None
        first_value, end_value = header.labels[:2]
        if end_value < _FLOAT32_EXACT:
            return int(first_value), int(end_value)
        first = int(first_value)
        if first_value >= _FLOAT32_EXACT:  # rounded: the first identity record near it is the boundary
            first = next((key for key in _rounded_keys(first_value) if self._is_identity(key)), None)
            if first is None:
                raise RecordIOError(f"{self.rec_path}: no identity record within the float32 rounding of the "
                                    f"header's first identity record {first_value:.0f}; the header does not "
                                    "describe this .rec (re-create the pair with insightface's tools)")
        ends = [key for key in _rounded_keys(end_value) if key > first and self._is_identity(key - 1)]
        return first, max(ends, default=int(end_value))

    def _is_identity(self, key: int) -> bool:
        """Whether `key` is an identity record: two labels (first image, end) and no image bytes."""
        if key not in self.offsets:
            return False
        record = self.read(key)
        return record.flag >= 2 and not record.image

    def close(self) -> None:
        """Close the file descriptor (the next `read` opens it again)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def _rounded_keys(value: float) -> list[int]:
    """The integers a float32 `value` may have been rounded from (half its spacing either side), ascending."""
    half = 2.0 ** (math.floor(math.log2(value)) - 24)  # float32 has 24 significant bits
    return list(range(math.ceil(value - half), math.floor(value + half) + 1))
