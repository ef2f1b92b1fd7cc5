"""One run directory, one writer: a live holder is named and refused, a gone holder is taken over, a requeued
Slurm job takes its own lock back, and `facescale train` on a held directory stops before writing anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facescale.train.run_lock import LOCK_NAME, RunDirLockedError, acquire_run_dir

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from pathlib import Path; from facescale.train.run_lock import acquire_run_dir;"
    "acquire_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
)


def _holder(run_dir: Path, **env: str) -> subprocess.Popen:
    """Another process that takes the lock of `run_dir` and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_live_holder_is_named_and_refused(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = _holder(tmp_path, SLURM_JOB_ID="777")
    try:
        with pytest.raises(RunDirLockedError) as info:
            acquire_run_dir(tmp_path)
        message = str(info.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "Slurm job 777" in message
        assert str(tmp_path / LOCK_NAME) in message and "logging.run_dir" in message
    finally:
        holder.kill()
        holder.wait()
    # the holder was SIGKILLed: its lock is left behind and taken over on this host at once
    lock = acquire_run_dir(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_gone_holder_on_this_host_is_taken_over_with_a_message(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path, pid=_dead_pid(), process_start="1")
    lock = acquire_run_dir(tmp_path)
    assert "is no longer running" in capsys.readouterr().err
    lock.release()


def test_reused_pid_counts_as_gone(tmp_path: Path, capsys, monkeypatch):
    """Our own pid recorded with another start time: a different process that happens to reuse the pid."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path, pid=os.getpid(), process_start="12345")
    acquire_run_dir(tmp_path).release()
    assert "is no longer running" in capsys.readouterr().err


def test_other_host_is_judged_by_its_heartbeat(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path, host="node-elsewhere", pid=1, age_s=5)
    with pytest.raises(RunDirLockedError, match="pid 1 on node-elsewhere"):
        acquire_run_dir(tmp_path, stale_after_s=60)
    _write_lock(tmp_path, host="node-elsewhere", pid=1, age_s=120)
    acquire_run_dir(tmp_path, stale_after_s=60).release()
    assert "sent no heartbeat for 120 s" in capsys.readouterr().err


def test_requeued_slurm_job_takes_its_own_lock_back(tmp_path: Path, capsys, monkeypatch):
    """The requeued job's old holder may still look alive (other node, fresh heartbeat): same job id wins."""
    _write_lock(tmp_path, host="node-elsewhere", pid=1, job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunDirLockedError, match="Slurm job 4242"):
        acquire_run_dir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = acquire_run_dir(tmp_path)
    assert "Slurm job 4242 was requeued" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["job_id"] == "4242"
    lock.release()


def test_second_train_refuses_at_once_and_writes_nothing(tmp_path: Path):
    from facescale.data.synth import synthesize

    synthesize(tmp_path / "data", identities=8, images_per_identity=2, holdout_identities=4, seed=0,
               verify_pairs=8)
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml",
             "--set", f"data.shards={tmp_path / 'data'}", "--set", "eval.bins=[]",
             "--set", f"logging.run_dir={run_dir}", "--set", "schedule.global_batch_size=16"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode != 0
    assert f"pid {holder.pid}" in out.stderr and "is in use by another run" in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME], "the refused run wrote into the dir"
    assert time.monotonic() - started < 120


def _train_argv(data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml",
            "--set", f"data.shards={data}", "--set", "eval.bins=[]", "--set", f"logging.run_dir={run_dir}",
            "--set", "schedule.global_batch_size=16"]


def test_a_run_dir_on_a_full_or_read_only_mount_is_one_line_before_the_process_group(tmp_path, small_fs):
    """Before, rank 0 raised an OSError traceback from the lock file's write (full) or mkdir (read-only)
    after the process group had started."""
    from facescale.data.synth import synthesize

    synthesize(tmp_path / "data", identities=8, images_per_identity=2, holdout_identities=4, seed=0,
               verify_pairs=8)
    with open(small_fs / "filler", "wb") as filler:  # fill the 8 MiB mount
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = subprocess.run(_train_argv(tmp_path / "data", small_fs / "run"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.strip().splitlines()[-1] == (
        f"facescale train: error: logging.run_dir '{small_fs / 'run'}': cannot write files in it (No space "
        "left on device); give logging.run_dir a folder this job can write")
    assert "Traceback" not in full.stderr

    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    read_only = subprocess.run(_train_argv(tmp_path / "data", small_fs / "new" / "run"), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert read_only.returncode == 2, read_only.stderr[-2000:]
    assert read_only.stderr.strip().splitlines()[-1] == (
        f"facescale train: error: logging.run_dir '{small_fs / 'new' / 'run'}': cannot create the folder "
        "(Read-only file system); give logging.run_dir a folder this job can write")


def test_a_lock_file_that_cannot_be_written_refuses_the_run_in_one_line(tmp_path, monkeypatch):
    """The mount filled (or turned read-only) between the start-up check and the lock: every rank refuses."""
    import errno

    from facescale.train import run_lock

    def no_space(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run_lock, "_create", no_space)
    with pytest.raises(RunDirLockedError) as refused:
        with run_lock.run_dir_lock(tmp_path / "run", rank=0):
            pass
    assert str(refused.value) == (f"logging.run_dir '{tmp_path / 'run'}': cannot write its lock file (No "
                                  "space left on device); give logging.run_dir a folder this job can write")
