"""`sbatch slurm/train_42m.sh` on a real local Slurm cluster (2 simulated nodes x 2 CPU ranks, gloo).

Checks the whole launch contract: exit code, TensorBoard events and checkpoints of a short run; then a
preemption signal mid-run (`scancel -s USR1`) -> checkpoint -> exit 3 -> `scontrol requeue` -> the same job id
resumes in the same run directory from the saved step and finishes. Slurm is installed and started by
`../shared/slurm/start-local-slurm.sh` (needs root and apt) and stopped at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_TOOLS = REPO.parent / "shared" / "slurm"
JOB_NAME = "fs-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SLURM_TOOLS / "start-local-slurm.sh").is_file(),
        reason=f"local Slurm scripts not found at {SLURM_TOOLS} (expected ../shared/slurm beside the repo)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting a local Slurm cluster needs root"),
]


@pytest.fixture(scope="module")
def slurm_cluster():
    start = subprocess.run(
        ["bash", str(SLURM_TOOLS / "start-local-slurm.sh"), "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
    yield
    subprocess.run(["bash", str(SLURM_TOOLS / "stop-local-slurm.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("slurm_synth")
    synthesize(out, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    return out


def _sbatch_args(out_dir: Path, shards: Path, steps: int, *overrides: str) -> list[str]:
    """sbatch options for the CPU cluster (no GPUs, 2 x 2 tasks), the script, then its `--set`s."""
    sets = [
        f"data.shards={shards}",
        "eval.bins=[]",
        f"schedule.steps={steps}",
        "schedule.warmup_steps=1",
        "schedule.global_batch_size=16",
        *overrides,
    ]
    return [
        f"--job-name={JOB_NAME}",
        "--nodes=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=10",
        f"--output={out_dir}/slurm-%j.out",
        "slurm/train_42m.sh",
        *[arg for s in sets for arg in ("--set", s)],
    ]


def _job_env(out_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CONFIG": "configs/synthetic.yaml",
        "FACESCALE_CLUSTER": "local",
        "RUN_ROOT": str(out_dir / "runs"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "SBATCH_WAIT_TIMEOUT": "240",
    }


def _job_info(job_id: str) -> dict[str, str]:
    line = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_sbatch_train_42m_runs_on_two_nodes(slurm_cluster, shards, tmp_path):
    args = _sbatch_args(tmp_path, shards, 4, "logging.every_steps=2", "checkpoint.every_steps=2")
    proc = subprocess.run(
        ["bash", str(SLURM_TOOLS / "sbatch-wait.sh"), *args],
        cwd=REPO,
        env=_job_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    job_id = proc.stdout.split()[0] if proc.stdout.split() else "?"
    log = next(tmp_path.glob("slurm-*.out"), None)
    log_text = log.read_text() if log else "(no job output)"
    assert proc.returncode == 0, proc.stderr[-2000:] + log_text[-5000:]

    run_dir = tmp_path / "runs" / f"{JOB_NAME}-{job_id}"  # keyed by job id
    assert "(2 x 2 tasks)" in log_text and "master n1:" in log_text
    assert {"train/loss", "perf/samples_per_s", "train/lr"} <= _scalar_tags(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    head = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000004" / "head").iterdir())
    assert head == [f"shard-{r:05d}-of-00004.pt" for r in range(4)]
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 4


def test_sbatch_torchrun_per_node_script(slurm_cluster, shards, tmp_path):
    args = _sbatch_args(tmp_path, shards, 2, "logging.every_steps=1")
    args = ["--ntasks-per-node=1", "--cpus-per-task=2"] + [
        a for a in args if not a.startswith(("--ntasks-per-node", "--cpus-per-task"))
    ]
    args[args.index("slurm/train_42m.sh")] = "slurm/train_torchrun.sh"
    proc = subprocess.run(
        ["bash", str(SLURM_TOOLS / "sbatch-wait.sh"), *args],
        cwd=REPO,
        env={**_job_env(tmp_path), "NPROC_PER_NODE": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    job_id = proc.stdout.split()[0] if proc.stdout.split() else "?"
    log = next(tmp_path.glob("slurm-*.out"), None)
    assert proc.returncode == 0, proc.stderr[-2000:] + (log.read_text()[-5000:] if log else "")
    step_dir = tmp_path / "runs" / f"{JOB_NAME}-{job_id}" / "checkpoints" / "step_00000002"
    assert len(list((step_dir / "head").iterdir())) == 4  # 2 nodes x 2 ranks from 2 torchrun agents


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm_cluster, shards, tmp_path):
    steps = 120
    args = _sbatch_args(tmp_path, shards, steps, "logging.every_steps=5", "checkpoint.every_steps=0")
    job_id = (
        subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=REPO,
            env=_job_env(tmp_path),
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    log = tmp_path / f"slurm-{job_id}.out"
    run_dir = tmp_path / "runs" / f"{JOB_NAME}-{job_id}"

    def training_progressed() -> bool:
        return log.is_file() and re.search(r"\[train\] step (1\d|[2-9]\d)/", log.read_text()) is not None

    try:
        _wait_for(training_progressed, 150, "training to pass step 10")
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        _wait_for(
            lambda: (
                _job_info(job_id).get("JobState")
                in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
            ),
            240,
            "the requeued job to finish",
        )
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    info = _job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Restarts"] == "1", info

    preempted = re.search(r"preempted at step (\d+)", text)
    assert preempted, text[-5000:]
    saved_step = int(preempted.group(1))
    assert 10 <= saved_step < steps
    assert f"requeueing job {job_id}" in text
    assert re.search(rf"resumed from \S+step_{saved_step:08d}\b.* at step {saved_step}\b", text), text[-5000:]
    assert text.count("=== facescale job") == 2  # the log was appended to, not truncated
    assert json.loads((run_dir / "result.json").read_text())["steps"] == steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert not (run_dir / "REQUEUE").exists()
