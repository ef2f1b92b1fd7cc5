"""Check a shard's `.idx` against its tar before a reader trusts the offsets in it.

Both readers read members at the `.idx` offsets; DALI crashes (SIGSEGV) on offsets that do not point at the
members, and the webdataset reader would read the wrong bytes. Each checked index line must name, for every
member, a 512-byte tar header right before the offset whose file name and size are the ones in the line.
Lines checked: the first, the last and evenly spread ones between (`CHECKED_LINES` in all): a shifted or
foreign index fails on its first line already; cost is a few reads per shard.
"""

from __future__ import annotations

import os
from pathlib import Path

from facescale.data.bad_data import read_index_lines
from facescale.data.manifest import ManifestError

TAR_BLOCK = 512
CHECKED_LINES = 16


class ShardIndexError(ManifestError):
    """A shard's `.idx` does not describe its tar (stale, shifted, or written for another tar)."""


def _reindex_hint(tar: Path) -> str:
    return (f"recreate it with `python -c \"from facescale.data.shard_writer import index_tar; "
            f"index_tar('{tar}')\"` (or `wds2idx`)")


def _header_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar/gnu tar header block, or None when the block is not a valid header."""
    if len(header) < TAR_BLOCK or header[257:262] != b"ustar":
        return None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    return (f"{prefix}/{name}" if prefix else name), size


def _picked(count: int) -> list[int]:
    """Line positions to check: first, last and evenly spread ones between."""
    if count <= CHECKED_LINES:
        return list(range(count))
    return sorted({round(i * (count - 1) / (CHECKED_LINES - 1)) for i in range(CHECKED_LINES)})


def check_index(tar_path: str | Path, index_path: str | Path, num_samples: int | None = None) -> None:
    """Raise ShardIndexError naming the `.idx` (line, member, offset) when it does not match `tar_path`."""
    tar_path, index_path = Path(tar_path), Path(index_path)
    try:
        samples = list(read_index_lines(index_path))
    except ValueError as exc:
        raise ShardIndexError(str(exc), fix=_reindex_hint(tar_path)) from None
    if num_samples is not None and len(samples) < num_samples:
        raise ShardIndexError(f"lists {len(samples)} samples but manifest.json counts {num_samples} in "
                              f"{tar_path.name}", where=index_path, fix=_reindex_hint(tar_path))
    if num_samples is not None and len(samples) > num_samples:  # the readers would disagree on the extra
        raise ShardIndexError(f"lists {len(samples)} samples but manifest.json counts {num_samples} in "
                              f"{tar_path.name}: the shard was replaced after manifest.json was written",
                              where=index_path, fix="restore the shard it counts, or regenerate the "
                              "directory (manifest.json with it) and check it with `facescale validate DIR`")
    file_size = tar_path.stat().st_size
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        for position in _picked(len(samples)):
            parts = samples[position].line.split()
            for i in range(0, len(parts), 4):
                offset, size, name = int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]
                if offset >= file_size:
                    continue  # a truncated tar: the readers report the lost samples one by one
                found = None
                if offset >= TAR_BLOCK and offset % TAR_BLOCK == 0:
                    found = _header_member(os.pread(fd, TAR_BLOCK, offset - TAR_BLOCK))
                if found != (name, size):
                    seen = f"a header of '{found[0]}' ({found[1]} B)" if found else "no tar header"
                    raise ShardIndexError(
                        f"line {position + 2} puts {name} ({size} B) at byte {offset}, but {tar_path.name} "
                        f"has {seen} there: the index is stale, shifted or belongs to another tar",
                        where=index_path, fix=_reindex_hint(tar_path))
    finally:
        os.close(fd)
