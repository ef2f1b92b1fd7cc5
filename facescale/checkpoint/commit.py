"""How a step directory becomes the checkpoint `latest` names, without ever touching a complete one.

Every save is written into a staging directory `step_XXXXXXXX.incomplete`. Rank 0 then writes `COMPLETE`
inside it, renames it to its step directory name (a step that already has a COMPLETE directory gets a new
name, `step_XXXXXXXX.2`, instead of being overwritten), and only then replaces `latest` (atomic rename).
Old directories are retired by renaming them to a hidden `.NAME.deleting` first, so a half-deleted step
is never mistaken for a complete one. A crash at any point leaves `latest` naming a complete step.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from facescale.checkpoint.atomic import atomic_write_text, remove_leftover_temps
from facescale.checkpoint.layout import (
    COMPLETE,
    HEAD_DIR,
    LATEST,
    STAGING_SUFFIX,
    STATE_DIR,
    CheckpointError,
    missing_files,
    parse_step_dir,
    step_dir_name,
)

DELETING_SUFFIX = ".deleting"


def staging_dir(root: Path, step: int) -> Path:
    return root / (step_dir_name(step) + STAGING_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def retire_dir(path: Path) -> None:
    """Delete a directory by renaming it out of sight first, then removing it."""
    hidden = path.with_name(f".{path.name}{DELETING_SUFFIX}")
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    except OSError:
        hidden = path  # cannot rename (e.g. read-only): remove in place, best effort
    shutil.rmtree(hidden, ignore_errors=True)


def prepare_staging(root: Path, step: int) -> Path:
    """An empty staging directory for `step` (a leftover of an interrupted save of it is removed)."""
    staging = staging_dir(root, step)
    if staging.exists():
        retire_dir(staging)
    for sub in (HEAD_DIR, STATE_DIR):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    return staging


def final_dir(root: Path, step: int) -> Path:
    """The name the staged `step` gets: its plain step name unless a COMPLETE directory has it."""
    version = 1
    while True:
        candidate = root / step_dir_name(step, version)
        if not candidate.exists():
            return candidate
        if not (candidate / COMPLETE).is_file():  # an interrupted save by an older facescale: never complete
            retire_dir(candidate)
            return candidate
        version += 1


def commit_step(
    root: Path, staging: Path, step: int, world_size: int, phase: Callable[[str], None] = lambda _: None
) -> Path:
    """Rank 0, after every rank wrote its files: mark `staging` complete, move it to its step name,
    switch `latest` to it; returns the step directory. `phase(name)` is called after each stage."""
    gaps = missing_files(staging, world_size, with_deepspeed=True)
    if gaps:
        raise CheckpointError(
            f"saving '{staging}': {', '.join(gaps)} did not appear after every rank reported success "
            "(is the run directory on a filesystem all ranks share?)"
        )
    atomic_write_text(staging / COMPLETE, f"{step}\n")
    phase(COMPLETE)
    target = final_dir(root, step)
    if target.name != step_dir_name(step):
        sys.stderr.write(
            f"[checkpoint] step {step} already has a complete directory; this save goes to {target.name} "
            f"and `latest` switches to it; the earlier one is removed after the switch\n"
        )
    os.rename(staging, target)
    fsync_dir(root)
    phase("rename")
    atomic_write_text(root / LATEST, target.name + "\n")
    fsync_dir(root)
    phase(LATEST)
    remove_leftover_temps(root / LATEST)  # an earlier process killed between its write and rename
    return target


def purge(root: Path, keep_last: int, current: Path) -> None:
    """Retire all but the newest `keep_last` complete steps (one directory per step, the newest version;
    `current` always stays), and every incomplete, staging or half-deleted leftover."""
    entries = [p for p in root.iterdir() if p.is_dir()]
    complete = sorted(
        (parse_step_dir(p.name), p) for p in entries if parse_step_dir(p.name) and (p / COMPLETE).is_file()
    )
    newest_per_step = {key[0]: path for key, path in complete}
    keep = set(list(newest_per_step.values())[-max(keep_last, 1):]) | {current}
    for path in entries:
        if path in keep:
            continue
        if parse_step_dir(path.name) or path.name.endswith(STAGING_SUFFIX):
            retire_dir(path)
        elif path.name.startswith(".") and path.name.endswith(DELETING_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
