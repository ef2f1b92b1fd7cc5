"""A run that resumes from a step saved with another backbone, head or optimizer is refused before it starts.

One real 1-rank `facescale train` writes a step; runs that then change a key fixing the saved state's shapes
or kinds get one line naming the key and both values (and nothing in the run directory is rewritten), where
they used to fail inside DeepSpeed's or torch's state-dict loader with a traceback, or lose state silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facescale.cli import main

REPO = Path(__file__).resolve().parents[1]


def _argv(shards: Path, run_dir: Path, *sets: str) -> list[str]:
    argv = ["train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=3",
                 "schedule.warmup_steps=0", "schedule.global_batch_size=16", "checkpoint.every_steps=3",
                 "data.num_workers=0", *sets):
        argv += ["--set", item]
    return argv


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run dir) of a finished 3-step run (demo backbone, embedding 128, SGD) with its step 3."""
    from facescale.data.synth import synthesize

    root = tmp_path_factory.mktemp("resume_check")
    shards = root / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=5, workers=1)
    run_dir = root / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "facescale", *_argv(shards, run_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    return shards, run_dir


@pytest.mark.parametrize(("change", "expect", "offers_weights"), [
    ("model.embedding_size=256", "model.embedding_size 128 (now 256)", False),
    ("model.name=mbf", "model.name 'demo' (now 'mbf')", False),
    ("optim.name=adamw", "optim.name 'sgd' (now 'adamw')", True),
    ("head.type=f2c head.sample_rate=1.0", "head.type 'partial_fc' (now 'f2c')", True),  # F2C has no sampling
])
def test_resume_with_another_state_shape_is_one_line_before_anything_runs(
        saved_run, capsys, monkeypatch, change, expect, offers_weights):
    shards, run_dir = saved_run
    monkeypatch.chdir(REPO)
    config_before = (run_dir / "config.yaml").read_bytes()
    sets = ("schedule.steps=6", "head.f2c.identities_per_rank=4", *change.split())
    assert main(_argv(shards, run_dir, *sets)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("facescale train: error: "), lines
    assert f"step_00000003 was saved with {expect}, so it cannot continue" in lines[0]
    assert ("model.init_from:" in lines[0]) == offers_weights  # a changed backbone cannot take its weights
    assert (run_dir / "config.yaml").read_bytes() == config_before


def test_an_explicit_resume_path_is_checked_too(saved_run, tmp_path, capsys, monkeypatch):
    shards, run_dir = saved_run
    monkeypatch.chdir(REPO)
    step = run_dir / "checkpoints" / "step_00000003"
    argv = _argv(shards, tmp_path / "other", f"checkpoint.resume={step}", "head.optimizer=adamw")
    assert main(argv) == 2
    assert "head.optimizer 'sgd' (now 'adamw')" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_mode_keys_count_only_for_their_mode(tmp_path):
    """head.optimizer fixes a Partial FC step's state (the centers' optimizer), not an F2C step's."""
    from facescale.config.errors import ConfigError
    from facescale.config.load import config_yaml
    from facescale.config.schema import Config
    from facescale.train import resume_check

    for head_type, refused in (("f2c", False), ("partial_fc", True)):
        saved = Config()
        saved.head.type, saved.head.optimizer = head_type, "sgd"
        (tmp_path / "config.yaml").write_text(config_yaml(saved))
        now = Config()
        now.head.type, now.head.optimizer = head_type, "adamw"
        if refused:
            with pytest.raises(ConfigError, match="head.optimizer 'sgd' \\(now 'adamw'\\)"):
                resume_check.check_resume_fits(now, tmp_path)
        else:
            resume_check.check_resume_fits(now, tmp_path)


def test_a_resume_with_another_global_batch_is_refused_unless_batch_per_rank_keeps_it(tmp_path):
    """A step saved at global batch 12 resumed at 24 was accepted and skipped data (its data position and
    step count are in steps of 12); batch_per_rank (arcface_torch style) takes the saved 12 instead."""
    from facescale.config.errors import ConfigError
    from facescale.config.load import config_yaml
    from facescale.config.schema import Config
    from facescale.train.resume_check import check_resume_fits, keep_saved_global_batch

    saved = Config()
    saved.schedule.global_batch_size = 12
    (tmp_path / "config.yaml").write_text(config_yaml(saved))
    now = Config()
    now.schedule.global_batch_size = 24
    with pytest.raises(ConfigError) as info:
        check_resume_fits(now, tmp_path, "run.yaml")
    line = info.value.line()
    assert line.startswith(f"run.yaml: checkpoint.resume: {tmp_path} was saved with "
                           "schedule.global_batch_size 12 (now 24)"), line
    assert "set schedule.global_batch_size: 12" in line and "\n" not in line
    per_rank = Config()
    per_rank.schedule.batch_per_rank = 4  # x 6 GPUs would be 24
    keep_saved_global_batch(per_rank, tmp_path)
    check_resume_fits(per_rank, tmp_path)
    assert per_rank.schedule.global_batch_size == 12
    now.schedule.global_batch_size = 12
    check_resume_fits(now, tmp_path)


@pytest.mark.slow
def test_batch_per_rank_run_resumed_on_another_gpu_count_keeps_its_global_batch(tmp_path):
    """An arcface_torch-style recipe (batch_per_rank, epochs) saved by 2 ranks and requeued on 1: the global
    batch stays the saved 8 (4 per rank x 2), so the run's step count and data position stay its own (they
    were refused, or silently changed, when batch_per_rank x 1 rank made a new global batch of 4)."""
    import yaml

    from facescale.data.synth import synthesize
    from launcher.local import local_train_command

    shards = tmp_path / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=5, workers=1)
    recipe = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    for key in ("steps", "warmup_steps", "global_batch_size"):
        recipe["schedule"].pop(key, None)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    sets = [f"data.shards={shards}", f"logging.run_dir={tmp_path / 'run'}", "eval.bins=[]",
            "data.num_workers=0", "schedule.batch_per_rank=4", "checkpoint.every_steps=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(local_train_command(2, str(config), [*sets, "schedule.epochs=0.5"]), cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "global batch 8 = 4 per rank x 2 ranks" in first.stdout + first.stderr  # 3 steps = 48 // 8 / 2
    argv = ["train", "--config", str(config)]
    argv += [x for item in [*sets, "schedule.epochs=1"] for x in ("--set", item)]
    second = subprocess.run([sys.executable, "-m", "facescale", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "so the global batch stays 8 as saved" in log and "1 epochs x 6 steps (48 samples // 8)" in log
    assert "at step 3" in log and "step 6/6" in log
    assert ("world size 2 -> 1: the rest of epoch 0 is drawn from the new plan, so samples of its first 3 "
            "batches may repeat or be missed in it") in log


def test_a_resume_that_plans_the_epoch_in_progress_anew_says_so(tmp_path):
    """Each worker of the webdataset reader reads a planned part of the epoch: another data.num_workers (as
    LoaderWorkerDied's advice may lead to) or world size re-plans the rest of the epoch in progress."""
    from facescale.config.schema import Config
    from facescale.train.resume_check import epoch_plan_change

    (tmp_path / "config.yaml").write_text("data:\n  num_workers: 4\n")
    cfg = Config()
    cfg.data.num_workers = 2
    mid = {"epoch": 5, "step_in_epoch": 7}
    by_8 = {"world_size": 8}
    line = epoch_plan_change(cfg, tmp_path, by_8, 8, mid, planned_by_workers=True)
    assert line == ("[facescale] data.num_workers 4 -> 2: the rest of epoch 5 is drawn from the new plan, so "
                    "samples of its first 7 batches may repeat or be missed in it; later epochs are whole")
    both = epoch_plan_change(cfg, tmp_path, by_8, 16, mid, planned_by_workers=True)
    assert both is not None and both.startswith("[facescale] world size 8 -> 16, data.num_workers 4 -> 2:")
    assert epoch_plan_change(cfg, tmp_path, by_8, 8, mid, planned_by_workers=False) is None  # DALI: none
    epoch_start = {"epoch": 6, "step_in_epoch": 0}  # nothing of it was trained yet
    assert epoch_plan_change(cfg, tmp_path, by_8, 16, epoch_start, planned_by_workers=True) is None
    cfg.data.num_workers = 4
    assert epoch_plan_change(cfg, tmp_path, by_8, 8, mid, planned_by_workers=True) is None


def test_a_resume_with_another_grad_accumulation_recounts_the_data_cursor(tmp_path):
    """The cursor counts micro-batches: saved at grad_accumulation 1 (batches of 12 samples over all ranks),
    a resume at 2 (batches of 6) continues at the same sample (it took 3 batches of 12 as 3 of 6); where
    the position falls inside a batch, or several workers take turns by batch, the epoch is replanned."""
    from facescale.config.schema import Config
    from facescale.train.resume_check import cursor_batch, epoch_plan_change, recount_cursor

    (tmp_path / "config.yaml").write_text("schedule:\n  global_batch_size: 12\n  grad_accumulation: 1\n"
                                          "data:\n  num_workers: 1\n")
    state = {"world_size": 2}  # saved before trainer.json kept cursor_batch: its config says 12 // 1
    assert cursor_batch(state, tmp_path) == 12 and cursor_batch({"cursor_batch": 6}, tmp_path) == 6
    mid = {"epoch": 1, "step_in_epoch": 3, "identity_batches": 9}
    assert recount_cursor(mid, 12, 6, 16) == {"epoch": 1, "step_in_epoch": 6, "identity_batches": 9}
    assert recount_cursor({"epoch": 1, "step_in_epoch": 7}, 6, 12, 8) == {"epoch": 1, "step_in_epoch": 3}
    assert recount_cursor({"epoch": 1, "step_in_epoch": 17}, 6, 12, 8) == {"epoch": 1, "step_in_epoch": 8}
    cfg = Config()
    cfg.schedule.global_batch_size, cfg.schedule.grad_accumulation, cfg.data.num_workers = 12, 2, 1
    assert epoch_plan_change(cfg, tmp_path, state, 2, mid, planned_by_workers=True, batch=6) is None
    cfg.schedule.grad_accumulation = 4  # 36 samples done: 12 batches of 3
    assert epoch_plan_change(cfg, tmp_path, state, 2, mid, planned_by_workers=False, batch=3) is None
    split = {"epoch": 1, "step_in_epoch": 7}  # 42 samples: inside the 4th batch of 12
    cfg.schedule.grad_accumulation = 1
    line = epoch_plan_change(cfg, tmp_path, {"cursor_batch": 6, "world_size": 2}, 2, split, False, batch=12)
    assert line == ("[facescale] schedule.grad_accumulation 2 -> 1: the rest of epoch 1 is drawn from the "
                    "new plan, so samples of its first 3 batches may repeat or be missed in it; later epochs "
                    "are whole")
    cfg.schedule.grad_accumulation, cfg.data.num_workers = 2, 4
    (tmp_path / "config.yaml").write_text("data:\n  num_workers: 4\n")
    line = epoch_plan_change(cfg, tmp_path, {"cursor_batch": 12, "world_size": 2}, 2, mid, True, batch=6)
    assert line is not None and line.startswith("[facescale] schedule.grad_accumulation 1 -> 2: the rest")


def test_a_step_resharded_offline_is_planned_for_the_ranks_that_trained_it(tmp_path):
    """`facescale reshard` of a 2-rank step for 3 ranks (then 4) rewrote trainer.json's world_size, so a
    3-rank resume said nothing of the epoch's new plan (its samples repeated and missed silently)."""
    import json

    import torch

    from facescale.checkpoint.layout import expected_files, read_trainer_state
    from facescale.checkpoint.reshard import reshard_checkpoint
    from facescale.config.schema import Config
    from facescale.train.resume_check import epoch_plan_change

    step = tmp_path / "step_00000003"
    for name in expected_files(2, with_deepspeed=False):
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, step / name)
    for rank in range(2):
        shard = {"meta": {"num_classes": 6, "start": 3 * rank, "count": 3}, "centers": torch.zeros(3, 2)}
        torch.save(shard, step / "head" / f"shard-{rank:05d}-of-00002.pt")
    (step / "config.yaml").write_text("data:\n  num_workers: 1\n")
    (step / "trainer.json").write_text(json.dumps({"step": 3, "world_size": 2, "has_deepspeed_files": False}))
    (step / "COMPLETE").write_text("3\n")
    cfg = Config()
    cfg.data.num_workers = 1
    mid = {"epoch": 0, "step_in_epoch": 3}
    for world in (3, 4):
        out = reshard_checkpoint(step, world, tmp_path / f"for_{world}")
        state = read_trainer_state(out)
        assert state["world_size"] == world and state["resharded_from"]["world_size"] == 2
        assert epoch_plan_change(cfg, out, state, world, mid, planned_by_workers=True).startswith(
            f"[facescale] world size 2 -> {world}: the rest of epoch 0")
        assert epoch_plan_change(cfg, out, state, 2, mid, planned_by_workers=True) is None
        step = out  # the 4-rank copy is cut from the 3-rank one
