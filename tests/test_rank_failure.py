"""A dead or hung rank ends the job: the surviving rank exits non-zero instead of hanging.

Ranks are started as plain processes with RANK/WORLD_SIZE (srun's task-per-GPU pattern: no agent that could
clean up for us). Mid-training one rank is SIGKILLed (dead: its sockets close) or SIGSTOPped (hung: its
sockets stay open, so only the collective timeout can end the other rank's wait).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.ports import free_port

REPO = Path(__file__).resolve().parents[1]
INIT_TIMEOUT_S = 30  # start-up of 2 ranks on 2 busy cores fits easily
TRAIN_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("failure_synth")
    synthesize(out, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    return out


def _start_ranks(shards: Path, run_dir: Path, world: int = 2) -> tuple[list[subprocess.Popen], list[Path]]:
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
        for s in (
            f"data.shards={shards}",
            "eval.bins=[]",
            f"logging.run_dir={run_dir}",
            "schedule.steps=100000",
            "schedule.warmup_steps=1",
            "schedule.global_batch_size=16",
            "logging.every_steps=2",
            "checkpoint.every_steps=0",
            f"dist.init_timeout_s={INIT_TIMEOUT_S}",
            f"dist.timeout_s={TRAIN_TIMEOUT_S}",
            "data.read_timeout_s=0",  # must be below dist.timeout_s; this test is about the collectives
        ):
            cmd += ["--set", s]
        log = run_dir.parent / f"rank{rank}.log"
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def _wait_until_training(procs: list[subprocess.Popen], log0: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(step) >= 4 for step in re.findall(r"\[train\] step\s+(\d+)/", log0.read_text())):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended before training started:\n" + log0.read_text()[-4000:])
        time.sleep(0.2)
    raise AssertionError("training did not start:\n" + log0.read_text()[-4000:])


def _survivor_exit(victim_signal: signal.Signals, shards: Path, tmp_path: Path,
                   victim: int = 1) -> tuple[int, float, str]:
    procs, logs = _start_ranks(shards, tmp_path / "run")
    try:
        _wait_until_training(procs, logs[0])
        os.kill(procs[victim].pid, victim_signal)
        t0 = time.monotonic()
        rc = procs[1 - victim].wait(timeout=INIT_TIMEOUT_S + 60)
        return rc, time.monotonic() - t0, logs[1 - victim].read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_killed_rank_ends_the_other_rank(shards, tmp_path):
    rc, elapsed, log = _survivor_exit(signal.SIGKILL, shards, tmp_path)
    assert rc != 0, log[-3000:]
    assert elapsed < TRAIN_TIMEOUT_S + 20, f"survivor took {elapsed:.0f} s to notice a dead peer"
    _assert_names_the_lost_rank(log)


@pytest.mark.slow
def test_hung_rank_ends_the_other_rank_within_the_timeout(shards, tmp_path):
    rc, elapsed, log = _survivor_exit(signal.SIGSTOP, shards, tmp_path)
    assert rc != 0, log[-3000:]
    # the training timeout once run.py passes dist.timeout_s to init_distributed, else the start-up one
    assert elapsed < INIT_TIMEOUT_S + 20, f"survivor waited {elapsed:.0f} s on a hung peer"
    assert re.search(r"[Tt]imed? ?out|timeout", log), log[-3000:]
    _assert_names_the_lost_rank(log)


@pytest.mark.slow
def test_killed_rank_zero_is_named_by_the_survivor(shards, tmp_path):
    """Rank 0 also hosts the job's store: the survivor cannot compare reports, and says rank 0 is gone."""
    rc, elapsed, log = _survivor_exit(signal.SIGKILL, shards, tmp_path, victim=0)
    assert rc != 0 and elapsed < TRAIN_TIMEOUT_S + 20, log[-3000:]
    errors = [line for line in log.splitlines() if ": error: " in line]
    assert len(errors) == 1, log[-3000:]
    expected = f"facescale train: error: rank 1 on {socket.gethostname()}: lost rank 0"
    assert errors[0].startswith(expected), errors


def _assert_names_the_lost_rank(log: str) -> None:
    """The survivor's last words: one line naming rank 1, its host and the cause; no traceback."""
    errors = [line for line in log.splitlines() if ": error: " in line]
    host = socket.gethostname()
    assert len(errors) == 1 and errors[0].startswith(f"facescale train: error: rank 1 on {host} stopped "
                                                     "responding"), log[-3000:]
    assert f"seen by rank 0 on {host}: " in errors[0] and "Traceback" not in log, log[-3000:]
