"""Write training samples as WebDataset tar shards, each with a DALI index, for both readers.

Shard format ("facescale-wds-1"), one format for every producer (synth, converters):

* shards are plain uncompressed tars named ``train-000000.tar``, ``train-000001.tar``, ... with at most
  ``shard_size`` samples each; samples are globally shuffled by the producer before they are written;
* a sample is two consecutive members sharing a key without dots (``000001234``): ``<key>.jpg`` (JPEG bytes,
  RGB) and ``<key>.lbl`` (the class label as 4-byte little-endian int32); members carry mtime 0, uid/gid 0
  and mode 0644, so equal inputs give byte-identical tars;
* next to each tar an index ``train-000000.idx`` in DALI's ``wds2idx`` text format: the first line is
  ``v1.2 <num_samples>``, then one line per sample with ``ext offset size name`` for each of its members,
  where ``offset`` is the byte offset of the member's data (not its header) inside the tar;
* ``manifest.json`` (see `facescale.data.manifest`) lists the shards with sample counts and sha256.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from facescale.data.manifest import ShardInfo

IMAGE_EXT = "jpg"
LABEL_EXT = "lbl"
INDEX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE


def sample_key(index: int) -> str:
    """The member key of the `index`-th written sample: zero-padded digits, never a dot."""
    return f"{index:09d}"


def encode_label(label: int) -> bytes:
    """A label as the `.lbl` payload: 4-byte little-endian int32 (what DALI reads with dtype INT32)."""
    if not 0 <= label < 2**31:
        raise ValueError(f"label {label} does not fit a non-negative int32")
    return struct.pack("<i", label)


def decode_label(payload: bytes) -> int:
    """Inverse of `encode_label`; raises ValueError on a payload that is not exactly 4 bytes."""
    if len(payload) != 4:
        raise ValueError(f"a .lbl payload is 4 bytes (little-endian int32), got {len(payload)}")
    return struct.unpack("<i", payload)[0]


class _HashingFile:
    """A write-only file that forwards to `target` and keeps a running sha256 of everything written."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.target.write(data)

    def tell(self) -> int:
        return self.target.tell()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Append (jpeg, label) samples to `prefix-%06d.tar` shards in `out_dir`, writing each shard's `.idx`.

    Keys are `sample_key(global position)`. `close()` returns the ShardInfo list for the manifest. A
    converter worker writing shard `n` of a larger set passes `start_shard=n, start_index=n * shard_size`.
    """

    def __init__(self, out_dir: str | Path, shard_size: int, prefix: str = "train", *, start_shard: int = 0,
                 start_index: int = 0) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.prefix = prefix
        self.start_shard, self.start_index = start_shard, start_index
        self.shards: list[ShardInfo] = []
        self.num_written = 0
        self._file: BinaryIO | None = None
        self._hashing: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._index_lines: list[str] = []

    def write(self, jpeg: bytes, label: int) -> str:
        """Append one sample; returns its key."""
        if self._tar is None:
            self._open_shard()
        key = sample_key(self.start_index + self.num_written)
        components = [self._add(f"{key}.{IMAGE_EXT}", jpeg),
                      self._add(f"{key}.{LABEL_EXT}", encode_label(label))]
        self._index_lines.append(" ".join(components))
        self.num_written += 1
        if len(self._index_lines) == self.shard_size:
            self._close_shard()
        return key

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any) and return every shard written."""
        if self._tar is not None:
            self._close_shard()
        return list(self.shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _shard_name(self) -> str:
        return f"{self.prefix}-{self.start_shard + len(self.shards):06d}.tar"

    def _open_shard(self) -> None:
        self._file = open(self.out_dir / self._shard_name(), "wb")  # noqa: SIM115 - closed in _close_shard
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self._index_lines = []

    def _add(self, name: str, payload: bytes) -> str:
        """Add one member and return its index component `ext offset size name`."""
        assert self._tar is not None
        self._tar.addfile(_member(name, len(payload)), io.BytesIO(payload))
        # tarfile advances `offset` past header + data padded to whole blocks; the data starts that far back.
        data_offset = self._tar.offset - -(-len(payload) // _BLOCK) * _BLOCK
        return f"{name.split('.', 1)[1]} {data_offset} {len(payload)} {name}"

    def _close_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._hashing is not None
        name = self._shard_name()
        self._tar.close()
        self._file.close()
        lines = self._index_lines
        index_text = f"{INDEX_VERSION} {len(lines)}\n" + "".join(f"{line}\n" for line in lines)
        (self.out_dir / ShardInfo(name, 0, "").index_name).write_text(index_text)
        self.shards.append(ShardInfo(name, len(self._index_lines), self._hashing.digest.hexdigest()))
        self._tar = self._file = self._hashing = None
        self._index_lines = []


def index_tar(tar_path: str | Path, index_path: str | Path | None = None) -> Path:
    """(Re)write the DALI index of an existing shard by reading its member offsets; returns the index path.

    The fix for a missing or stale `.idx`; members are grouped into samples by the key before the first dot.
    """
    tar_path = Path(tar_path)
    index_path = Path(index_path) if index_path else tar_path.with_suffix(".idx")
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _, ext = info.name.partition(".")
            component = f"{ext} {info.offset_data} {info.size} {info.name}"
            if key == last_key:
                samples[-1].append(component)
            else:
                samples.append([component])
                last_key = key
    if not samples:
        raise ValueError(f"{tar_path} holds no files; a shard needs <key>.jpg + <key>.lbl members")
    index_path.write_text(f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    return index_path
