"""Whether an output can be written, checked before the work that produces it starts: a long extraction or
a training run must not end by failing to write its result to a read-only, full or mistyped folder."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from facescale.errors import InputError


def folder_write_problem(folder: Path) -> tuple[str, OSError] | None:
    """("create" | "write", the error) when `folder` could not be created or a file not written in it, else
    None. Nothing is left behind (an input error must not leave outputs): a scratch file is written and
    removed in `folder`, or, while it does not exist yet, in its nearest existing ancestor, where creating it
    would start. The scratch name is per host and process, so ranks may probe at once."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a file where a folder has to be
        code = errno.EEXIST if existing == folder else errno.ENOTDIR
        return "create", OSError(code, os.strerror(code), str(existing))
    scratch = existing / f".write-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        scratch.write_bytes(b"facescale write probe\n")  # a block of data: a full disk fails here
        scratch.unlink()
    except OSError as error:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)  # folders could be made, files not written
        return ("write" if existing == folder or full else "create"), error
    return None


def require_writable(path: str | Path, option: str, *, is_file: bool = False) -> None:
    """The folder `path` (or, `is_file`, the folder of the file `path`) can be created and written, else an
    InputError naming `option` (a flag or config key) and `path`."""
    problem = folder_write_problem(Path(path).parent if is_file else Path(path))
    if problem is not None:
        action, error = problem
        where = {("create", False): "the folder", ("create", True): "its folder",
                 ("write", False): "files in it", ("write", True): "there"}[action, is_file]
        raise InputError(f"cannot {action} {where} ({error.strerror or error})", where=f"{option} '{path}'",
                         fix=f"give {option} a {'file in a ' if is_file else ''}folder this job can write")
