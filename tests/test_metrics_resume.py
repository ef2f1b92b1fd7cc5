"""A run resumed from a checkpoint older than what it had logged shows each step once, as the resumed run
computed it: TensorBoard hides the earlier job's later events, metrics.jsonl moves their lines aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from facescale.metrics.writer import MetricsWriter

REPO = Path(__file__).resolve().parents[1]


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(event.step, event.value) for event in acc.Scalars(tag)]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resumed_writer_shows_each_step_once_and_keeps_the_old_lines(tmp_path) -> None:
    first = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 7):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "time": 1.0, "train/lo')  # the job was killed while writing this line
    time.sleep(1.1)  # event file names carry whole seconds

    second = MetricsWriter(tmp_path, enabled=True, resumed_at=3)
    assert second.superseded == (4, 6)  # the cut line has no step to report
    for step in range(4, 8):
        second.scalars(step, {"train/loss": 100.0 + step})
    second.close()

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert _tensorboard_scalars(tmp_path, "train/loss") == expected
    rows = _jsonl(tmp_path / "metrics.jsonl")  # every line parses: the cut one was moved aside
    assert [(r["step"], r["train/loss"]) for r in rows] == expected
    old = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["train/loss"] for line in old[:3]] == [4.0, 5.0, 6.0]
    assert old[3] == '{"step": 7, "time": 1.0, "train/lo'


def test_resume_at_the_last_logged_step_moves_nothing(tmp_path) -> None:
    first = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    second = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resumed_at=3)
    second.close()
    assert second.superseded is None
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "metrics.superseded.jsonl").exists()


def _train(shards: Path, run_dir: Path, *sets: str) -> str:
    argv = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=6",
                 "schedule.warmup_steps=0", "schedule.global_batch_size=16", "checkpoint.every_steps=3",
                 "data.num_workers=0", "logging.every_steps=1", *sets):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_resumed_from_an_earlier_step_logs_each_step_once(tmp_path) -> None:
    """The job that is resumed from step 3 after it had logged steps 4-6 (a crash after them, or a resume
    named by hand): TensorBoard and metrics.jsonl end with steps 1-6 once each, the exact resume's losses."""
    from facescale.data.synth import synthesize

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=5, workers=1)
    _train(shards, run_dir)
    first = {r["step"]: r["train/loss"] for r in _jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    time.sleep(1.1)  # event file names carry whole seconds

    log = _train(shards, run_dir, f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000003'}")
    assert "steps 4-6, logged before the resume past this checkpoint, are done again" in log
    rows = [r for r in _jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in rows] == [first[s] for s in range(1, 7)]  # resume is exact
    assert [step for step, _ in _tensorboard_scalars(run_dir, "train/loss")] == [1, 2, 3, 4, 5, 6]
    old = [r["step"] for r in _jsonl(run_dir / "metrics.superseded.jsonl") if "train/loss" in r]
    assert old == [4, 5, 6]


def test_a_full_disk_stops_the_metrics_not_the_training(small_fs, capsys) -> None:
    """metrics.jsonl's write raised ENOSPC inside rank 0's training loop (the run ended there, the other
    ranks left waiting); now each sink says once that it stopped and the loop goes on. A resume tidies up."""
    from facescale.metrics.console import setup_run_logging

    setup_run_logging(None, rank=0)  # console lines to this test's captured stdout
    run_dir = small_fs / "run"
    writer = MetricsWriter(run_dir, enabled=True)
    writer.scalars(1, {"train/loss": 1.0})
    filler = small_fs / "filler"
    with open(filler, "wb") as handle, pytest.raises(OSError):
        handle.write(b"\0" * (16 << 20))  # more than the 8 MiB file system holds
    for step in range(2, 400):
        writer.scalars(step, {"train/loss": float(step), "train/lr": 0.1})
    writer.close()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "cannot be written" in line]
    assert len(warnings) == 2, warnings  # one for TensorBoard, one for metrics.jsonl
    assert any(f"{run_dir / 'metrics.jsonl'} cannot be written ([Errno 28]" in w for w in warnings)
    assert any("TensorBoard" in w for w in warnings)

    filler.unlink()  # space again: the next job resumes from a checkpoint at step 1
    resumed = MetricsWriter(run_dir, enabled=True, resumed_at=1)
    resumed.scalars(2, {"train/loss": 2.0})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


class _FakeWandb:
    """Stands in for the `wandb` module: records init's arguments, or fails as W&B without an API key."""

    def __init__(self, fail: bool) -> None:
        self.fail, self.inits = fail, []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.fail:
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        return SimpleNamespace(log=lambda values, step: None, finish=lambda: None)


def test_wandb_mode_unset_leaves_wandb_mode_to_the_environment(tmp_path, monkeypatch) -> None:
    from facescale.config.schema import WandbConfig

    fake = _FakeWandb(fail=False)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for cfg in (WandbConfig(project="probe"), WandbConfig(project="probe", mode="offline")):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb=cfg).close()
    assert [init["mode"] for init in fake.inits] == [None, "offline"]  # None: W&B reads WANDB_MODE itself


def test_a_wandb_run_that_cannot_start_is_one_warning(tmp_path, monkeypatch, capsys) -> None:
    from facescale.config.schema import WandbConfig
    from facescale.metrics.console import setup_run_logging

    setup_run_logging(None, rank=0)  # console lines to this test's captured stdout
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail=True))
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb=WandbConfig(project="probe"))
    writer.scalars(1, {"train/loss": 1.0})
    writer.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "W&B cannot be written (api_key not configured" in out[0], out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
