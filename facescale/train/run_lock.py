"""One run directory, one writer: rank 0 holds `<run_dir>/LOCK` (host, pid, Slurm job id) while it trains.

A second run on the same directory refuses at once, naming the holder. A lock whose holder is gone is
taken over with a message: on the same host when its process no longer exists (pid and start time), on
another host when its heartbeat (the file's mtime, refreshed every `HEARTBEAT_S`) is older than
`stale_after_s`. A requeued Slurm job (same `SLURM_JOB_ID`) takes its own lock back at once. The file is
created with O_EXCL and taken over by renaming it aside, so two starters cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from facescale.errors import InputError

LOCK_NAME = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = float(os.environ.get("FACESCALE_LOCK_STALE_S", 600))


class RunDirLockedError(InputError):
    """Another live run holds this run directory (every rank raises it alike; rank 0 prints it)."""

    every_rank = True


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): existence only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "job_id": os.environ.get("SLURM_JOB_ID") or None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def takeover_reason(
    holder: dict[str, Any], age_s: float, me: dict[str, Any], stale_after_s: float
) -> str | None:
    """Why the lock `holder` may be taken by `me` (None: it is held by a live run)."""
    if me["job_id"] and holder.get("job_id") == me["job_id"]:
        return f"Slurm job {me['job_id']} was requeued; taking its own lock back"
    if holder.get("host") == me["host"]:
        start = _process_start(int(holder.get("pid") or -1))
        if start is None or start not in (holder.get("process_start"), "unknown"):
            return f"its holder ({describe(holder)}) is no longer running"
        return None
    if age_s > stale_after_s:
        return f"its holder ({describe(holder)}) sent no heartbeat for {age_s:.0f} s"
    return None


@dataclass
class RunDirLock:
    """The lock this process holds; `release()` removes it (only while it is still ours)."""

    path: Path
    content: str
    _stop: threading.Event

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                sys.stderr.write(f"[facescale] warning: {self.path} was taken by another run\n")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _ours(self) -> bool:
        try:
            return self.path.read_text() == self.content
        except OSError:
            return False

    def release(self) -> None:
        self._stop.set()
        if self._ours():
            self.path.unlink(missing_ok=True)


def _create(path: Path, content: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> tuple[str, dict[str, Any], float]:
    """(raw text, holder, age in seconds); an unreadable lock counts as a live holder we cannot name."""
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "", {}, 0.0
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {"host": "?", "pid": "?"}
    return text, holder if isinstance(holder, dict) else {}, age


def acquire_run_dir(run_dir: Path, stale_after_s: float = STALE_AFTER_S) -> RunDirLock:
    """Take the lock of `run_dir` for this process, or raise RunDirLockedError naming its holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = _me()
    content = json.dumps(me, indent=2) + "\n"
    for _ in range(5):
        if _create(path, content):
            lock = RunDirLock(path, content, threading.Event())
            threading.Thread(target=lock._heartbeat, name="run-dir-lock", daemon=True).start()
            return lock
        text, holder, age = _read(path)
        if not text and not path.exists():
            continue  # released meanwhile
        reason = takeover_reason(holder, age, me, stale_after_s)
        if reason is None:
            raise RunDirLockedError(
                f"run directory '{run_dir}' is in use by another run ({describe(holder)}; lock file {path}); "
                "two runs in one directory overwrite each other's checkpoints. Wait for it to end, or set "
                "another logging.run_dir; if that run is certainly gone, delete the lock file"
            )
        aside = path.with_name(f".{LOCK_NAME}.stale.{me['pid']}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if aside.read_text() != text:  # another starter replaced it between our read and rename: give back
            os.rename(aside, path)
            continue
        aside.unlink(missing_ok=True)
        sys.stderr.write(f"[facescale] taking over the lock of '{run_dir}': {reason}\n")
    raise RunDirLockedError(f"could not take the lock {path}: other runs keep changing it")


@contextmanager
def run_dir_lock(run_dir: str | Path, rank: int) -> Iterator[None]:
    """Collective: rank 0 holds the lock of `run_dir` for the block; when it cannot, every rank raises."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = acquire_run_dir(Path(run_dir))
        except RunDirLockedError as exc:
            refusal = str(exc)
        except OSError as exc:  # the mount turned read-only or full since the start-up check (writable.py)
            refusal = (f"logging.run_dir '{run_dir}': cannot write its lock file ({exc.strerror or exc}); "
                       "give logging.run_dir a folder this job can write")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise RunDirLockedError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
