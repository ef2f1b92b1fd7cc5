"""Disk full, quota-like ENOSPC mid-write and a read-only run directory while saving, on a small tmpfs.

Every rank ends with a CheckpointSaveError naming the directory, the bytes the save needs and what to do;
the previous `latest` still loads; no partial step is left. `facescale train` warns at start-up when the
run directory cannot hold keep_last + 1 checkpoints and exits with a code that is not the requeue code.
Skipped where a tmpfs cannot be mounted (needs root or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

REPO = Path(__file__).resolve().parents[1]
WIDTH = 256  # Linear(WIDTH, WIDTH): 256 KiB of weights, a checkpoint of about 1.5 MiB


def _parts(rank: int, world: int):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    torch.manual_seed(0)
    model = torch.nn.Linear(WIDTH, WIDTH)
    config = {"train_batch_size": world, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), config=config
    )
    return engine, build_head(HeadConfig(), 64, WIDTH, seed=1)


def _fill(mount: Path, leave: int) -> None:
    """Leave about `leave` bytes free on `mount`."""
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    (mount / "filler").write_bytes(b"\0" * max(0, free - leave))


def _save_fails(rank: int, world: int, mount: str, how: str) -> tuple[str, str, list[str]]:
    from facescale.checkpoint import CheckpointManager
    from facescale.checkpoint.disk_space import CheckpointSaveError

    engine, head = _parts(rank, world)
    run_dir = Path(mount) / "run"
    manager = CheckpointManager(run_dir, rank, world, keep_last=2)
    manager.save(1, engine, head, {"seed": 0}, "x: 1\n")
    saved = head.centers.detach().clone()
    size = sum(p.stat().st_size for p in (run_dir / "checkpoints/step_00000001").rglob("*") if p.is_file())
    torch.distributed.barrier()
    if rank == 0:
        if how == "short":  # less than the save needs: refused before anything is written
            _fill(Path(mount), size // 2)
        elif how == "midway":  # enough for the estimate, not for the files: ENOSPC in the middle
            _fill(Path(mount), size - 24 * 1024)  # DeepSpeed's 41 KB of scripts are not in the estimate
        else:
            subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    torch.distributed.barrier()
    head.centers.add_(1.0)
    try:
        manager.save(2, engine, head, {"seed": 0}, "x: 1\n")
        message = "saved"
    except CheckpointSaveError as exc:
        message = str(exc)
    torch.distributed.barrier()
    if rank == 0:
        if how == "readonly":
            subprocess.run(["mount", "-o", "remount,rw", mount], check=True)
        (Path(mount) / "filler").unlink(missing_ok=True)
    torch.distributed.barrier()
    latest = manager.latest()
    head2 = build_fresh_head()
    manager.load(latest, engine, head2)
    loaded_old = torch.equal(head2.centers, saved)
    entries = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return message, f"{latest.name} old={loaded_old}", entries


def build_fresh_head():
    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    return build_head(HeadConfig(), 64, WIDTH, seed=9)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["short", "midway", "readonly"])
def test_failed_save_is_clean_on_every_rank(small_fs: Path, how: str):
    results = run_ranks(_save_fails, 2, str(small_fs), how, timeout=600)
    staging = small_fs / "run" / "checkpoints" / "step_00000002.incomplete"
    for rank, (message, latest, entries) in enumerate(results):
        assert message.startswith(f"cannot save checkpoint '{staging}'"), (rank, message)
        assert "needs about" in message and "logging.run_dir" in message, message
        assert latest == "step_00000001 old=True", (rank, latest)
        assert entries == ["latest", "step_00000001"], (rank, entries)
    first = results[0][0]
    if how == "short":
        assert "free" in first
    elif how == "midway":
        assert "disk or quota is full" in first, first
    else:
        assert "not writable" in first


@pytest.mark.slow
def test_train_warns_at_start_and_exits_without_requeue(small_fs: Path, tmp_path: Path):
    from facescale.data.synth import synthesize

    synthesize(tmp_path / "data", identities=8, images_per_identity=2, holdout_identities=0, seed=0)
    marker = small_fs / "REQUEUE"
    marker.write_text("SIGTERM\n")  # as if a preemption had asked for a requeue before the failing save
    run_dir = small_fs / "run"
    cmd = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    for override in (f"data.shards={tmp_path / 'data'}", "eval.bins=[]", f"logging.run_dir={run_dir}",
                     "schedule.steps=1", "schedule.warmup_steps=0", "schedule.global_batch_size=8",
                     "data.num_workers=0", "checkpoint.keep_last=2"):
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACESCALE_REQUEUE_MARKER": str(marker)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 74, out[-3000:]  # not 3: a batch script must not requeue into the same failure
    assert "warning:" in out and "checkpoint.keep_last=2" in out, out[-3000:]
    assert f"facescale train: error: cannot save checkpoint '{run_dir / 'checkpoints'}" in out, out[-3000:]
    assert not marker.exists()
    assert not any((run_dir / "checkpoints").glob("step_*")), "a partial step was left behind"
