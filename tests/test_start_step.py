"""schedule.start_step: a fresh run goes on with the schedule of a run trained elsewhere (an arcface_torch
checkpoint_gpu_0.pt loaded with model.init_from): its learning rate, step count and data position are those
of a run that did those steps here. The reference is a plain run of the whole schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _train(shards: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=6",
                 "schedule.warmup_steps=2", "schedule.global_batch_size=16", "data.num_workers=0",
                 "logging.every_steps=1", *sets):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _lrs(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}


def _cursor(run_dir: Path) -> dict:
    step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(step / "state" / "rank-00000.pt", weights_only=False)["loader"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 identities x 4 images: 3 steps of 16 per epoch."""
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("start_step") / "shards"
    synthesize(out, identities=12, images_per_identity=4, holdout_identities=0, seed=7, workers=1)
    return out


@pytest.mark.slow
def test_a_run_started_at_step_4_continues_the_whole_runs_schedule(shards, tmp_path) -> None:
    whole = _train(shards, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    later = _train(shards, tmp_path / "later", "schedule.start_step=4")
    out = later.stdout + later.stderr
    assert later.returncode == 0, out[-2000:]
    assert "schedule.start_step: this run starts at step 4 of 6 (epoch 1.33" in out
    reference = _lrs(tmp_path / "whole")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert _lrs(tmp_path / "later") == {5: reference[5], 6: reference[6]}  # two steps, the same lr
    # the data position: both runs end after batch 6 (epoch 2); from batch 0 it would be epoch 0, batch 2
    assert _cursor(tmp_path / "later") == _cursor(tmp_path / "whole") == {"epoch": 2, "step_in_epoch": 0}

    resumed = _train(shards, tmp_path / "later", "schedule.steps=7", "schedule.start_step=4")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-2000:]
    assert "schedule.start_step ignored: this run resumes from" in out and "at step 6" in out


def test_start_step_outside_the_schedule_is_one_line(shards, tmp_path, capsys) -> None:
    from facescale.cli import main

    argv = ["train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"logging.run_dir={tmp_path / 'run'}", "schedule.steps=6",
                 "schedule.warmup_steps=0", "schedule.start_step=6"):
        argv += ["--set", item]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "schedule.start_step: 6 must be >= 0 and smaller than schedule.steps (6)" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_arcface_torch_checkpoint_says_where_its_run_was(shards, tmp_path) -> None:
    """The checkpoint_gpu_0.pt that arcface_torch's save_all_states writes: its global_step is named with
    the setting that goes on from it; with that setting given, the run starts there and says nothing more."""
    from facescale.config.schema import ModelConfig
    from facescale.models.registry import build_backbone

    backbone = build_backbone(ModelConfig(name="demo", embedding_size=128)).state_dict()
    saved = tmp_path / "arcface" / "checkpoint_gpu_0.pt"
    saved.parent.mkdir()
    torch.save({"epoch": 1, "global_step": 3, "state_dict_backbone": backbone,
                "state_dict_softmax_fc": {"weight": torch.zeros(6, 128)}, "state_optimizer": {},
                "state_lr_scheduler": {"last_epoch": 3}}, saved)
    fresh = _train(shards, tmp_path / "a", f"model.init_from={saved}")
    out = fresh.stdout + fresh.stderr
    assert fresh.returncode == 0, out[-2000:]
    assert ("arcface_torch saved it at global_step 3 (epoch 1) and this run starts its schedule at step 0; "
            "to go on with that run's learning rate, epochs and optimizer state, set "
            "schedule.start_step=3") in out
    going_on = _train(shards, tmp_path / "b", f"model.init_from={saved}", "schedule.start_step=3")
    out = going_on.stdout + going_on.stderr
    assert going_on.returncode == 0, out[-2000:]
    assert "global_step 3" not in out and "this run starts at step 3 of 6" in out
    assert "the backbone's optimizer state starts fresh: the checkpoint has no state_optimizer" in out
    assert sorted(_lrs(tmp_path / "b")) == [4, 5, 6]
