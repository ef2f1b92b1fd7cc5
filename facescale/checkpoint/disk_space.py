"""Disk space for checkpoints: the bytes a save writes, the check before writing, the error when it fails.

A save that cannot be written (disk full, quota, read-only run directory) ends on every rank with a
`CheckpointSaveError` that names the directory, the bytes the save needs and what to do. Its exit code is
not the requeue code: restarting the job cannot help until someone frees space.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch

from facescale.checkpoint.layout import CheckpointError

SAVE_FAILED_EXIT_CODE = 74  # EX_IOERR; launcher/preemption.REQUEUE_EXIT_CODE (3) is the only requeue code
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FIXES = (
    "free space there (delete old runs, lower checkpoint.keep_last) or point logging.run_dir at a larger "
    "filesystem, then resume: `latest` still names the previous complete checkpoint"
)


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the previous `latest` is untouched. Every rank raises it alike."""

    exit_code = SAVE_FAILED_EXIT_CODE
    every_rank = True


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (what `torch.save` writes, give or take headers)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def shortage_message(directory: Path, needed: int, free: int) -> str:
    return (
        f"cannot save checkpoint '{directory}': it needs about {gib(needed)} and the filesystem has "
        f"{gib(free)} free; {FIXES}"
    )


TORCH_WRITE_FAILURES = ("iostream error", "failed writing", "unexpected pos")  # torch.save's ENOSPC texts


def write_failure_message(directory: Path, what: str, error: BaseException, needed: int, rank: int) -> str:
    """The message for a write that failed on `rank`, with the cause in words a person can act on.
    torch.save reports a full disk without errno, so its stream errors count as full when space is short."""
    code = getattr(error, "errno", None)
    stream = any(text in str(error) for text in TORCH_WRITE_FAILURES)
    free = free_bytes(directory)
    if code == errno.EDQUOT:
        cause = "the disk quota is exceeded"
    elif code == errno.ENOSPC or (stream and free < needed):
        cause = f"the disk or quota is full: {gib(free)} free"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause = "the run directory is not writable (read-only filesystem or permissions)"
    else:
        cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return (
        f"cannot save checkpoint '{directory}': rank {rank} failed {what} ({cause}); the save needs about "
        f"{gib(needed)}. The partial step was removed; {FIXES}"
    )


def startup_space_warning(run_dir: Path, per_checkpoint: int, keep_last: int, existing: int) -> str | None:
    """A warning when the run directory cannot hold `keep_last + 1` checkpoints (one more is written before
    the oldest is removed); `existing` complete checkpoints of this run already take their share."""
    needed = max(0, keep_last + 1 - existing) * per_checkpoint
    free = free_bytes(run_dir)
    if free >= needed:
        return None
    return (
        f"[facescale] warning: '{run_dir}' has {gib(free)} free but checkpoint.keep_last={keep_last} "
        f"checkpoints of about {gib(per_checkpoint)} each need {gib(needed)} more ({keep_last} kept + 1 "
        f"being written); a save will fail when the disk fills. {FIXES.split(', then')[0]}"
    )
