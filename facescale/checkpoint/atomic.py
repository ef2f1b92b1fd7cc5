"""Write files so that a crash leaves either the old content or the new, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def temp_beside(path: Path) -> Path:
    """The sibling temp file a write of `path` goes to before it is renamed over it (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_leftover_temps(path: Path) -> None:
    """Remove the temp files of `path` that processes killed between their write and rename left behind."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a sibling temp file, fsync, then rename over `path`."""
    tmp = temp_beside(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file and an atomic rename."""
    tmp = temp_beside(path)
    torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
