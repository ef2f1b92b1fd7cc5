"""Write files so that a crash leaves either the old content or the new, never half of one."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch


def temp_beside(path: Path) -> Path:
    """The sibling temp file a write of `path` goes to before it is renamed over it (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


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


def folder_write_problem(folder: Path) -> tuple[str, OSError] | None:
    """("create" | "write", the error) when `folder` cannot be created or a file written in it (a scratch
    file, removed again), else None: a command that writes only later checks this before its work starts.
    The folder is left created; the scratch name is per host and process, so ranks may probe at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return "create", error
    scratch = folder / f".write-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        scratch.write_bytes(b"facescale write probe\n")  # a block of data: a full disk fails here
        scratch.unlink()
    except OSError as error:
        return "write", error
    return None
