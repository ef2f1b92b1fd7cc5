"""slurm/env/common.sh helpers, run by bash outside Slurm (the end-to-end jobs are in test_slurm.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the lines of `torchrun --help` that matter here, as torch 2.13 and torch 2.11 print them
NEWER_USAGE = "[--shutdown-timeout SHUTDOWN_TIMEOUT] [--virtual-local-rank]\n  training_script ..."
OLDER_USAGE = "[--signals-to-handle SIGNALS_TO_HANDLE] [--virtual-local-rank]\n  training_script ..."


def _fake_python(tmp_path: Path, usage: str) -> Path:
    """An executable that answers `-m torch.distributed.run --help` with `usage`, as that torch's would."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/bash\n[[ "$*" == "-m torch.distributed.run --help" ]] || exit 9\n'
                      f"cat <<'EOF'\n{usage}\nEOF\n")
    script.chmod(0o755)
    return script


def _grace(python: Path, **env: str) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "FACESCALE_SHUTDOWN_TIMEOUT"}
    env = {**inherited, "PYTHON": str(python), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "SLURM_JOB_ID": "7", **env}
    return subprocess.run(["bash", "-c", "source slurm/env/common.sh && facescale_torchrun_grace"], cwd=REPO,
                          env=env, capture_output=True, text=True, check=True, timeout=30)


@pytest.mark.parametrize("setting, expected", [(None, "--shutdown-timeout=300"),
                                              ("120", "--shutdown-timeout=120")])
def test_torchrun_that_has_the_option_gets_the_grace(tmp_path: Path, setting: str | None,
                                                     expected: str) -> None:
    extra = {} if setting is None else {"FACESCALE_SHUTDOWN_TIMEOUT": setting}
    proc = _grace(_fake_python(tmp_path, NEWER_USAGE), **extra)
    assert proc.stdout.strip() == expected and proc.stderr == ""


def test_older_torchrun_gets_no_option_and_the_job_log_says_why(tmp_path: Path) -> None:
    proc = _grace(_fake_python(tmp_path, OLDER_USAGE))
    assert proc.stdout.strip() == ""  # torch 2.11's torchrun stops at an unknown option (exit 2)
    assert "no --shutdown-timeout" in proc.stderr and "30 s" in proc.stderr


@pytest.mark.parametrize(("job", "restarts"), [(4242, 0), (4242, 1), (123_456, 3), (11_999, 0)])
def test_the_batch_scripts_port_is_launcher_ports_and_below_the_ephemeral_range(job, restarts) -> None:
    """A plain srun (launcher/env.py) and the batch scripts pick the same port for a job and requeue, below
    Linux's default ephemeral range (32768-60999), where any outgoing connection may hold a port."""
    from launcher.ports import job_port

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "SLURM_RESTART_COUNT")}
    env.update(MASTER_ADDR="127.0.0.1", SLURM_JOB_ID=str(job), SLURM_RESTART_COUNT=str(restarts))
    out = subprocess.run(["bash", "-c", "source slurm/env/common.sh && echo $MASTER_PORT"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert int(out) == job_port(job, restarts) and 1024 < int(out) < 32768
    if restarts:
        assert job_port(job, restarts) != job_port(job, 0)
