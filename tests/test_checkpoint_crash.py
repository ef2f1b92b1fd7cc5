"""Crash safety: a rank SIGKILLed between its shard writes leaves `latest` on the previous complete step, and
incomplete, damaged or mismatched checkpoints are refused with messages that name what is missing."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

NUM_CLASSES, EMB = 7, 4


def _parts(rank: int, world: int, num_classes: int = NUM_CLASSES):
    """A tiny DeepSpeed engine (one Linear) and a Partial FC head shard."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    torch.manual_seed(0)
    model = torch.nn.Linear(3, EMB)
    config = {
        "train_batch_size": world,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config
    )
    head = build_head(HeadConfig(), num_classes, EMB, seed=1)
    return engine, head


def _save_then_die(rank: int, world: int, run_dir: str) -> None:
    from facescale.checkpoint import CheckpointManager

    engine, head = _parts(rank, world)
    manager = CheckpointManager(run_dir, rank, world)
    manager.save(1, engine, head, {"seed": 0}, "x: 1\n")
    head.centers.add_(1.0)

    def die_after_head_shard(name: str) -> None:
        if rank == 1 and name.startswith("head/"):
            os.kill(os.getpid(), signal.SIGKILL)  # no warning, no cleanup

    manager.on_file_written = die_after_head_shard
    manager.save(2, engine, head, {"seed": 0}, "x: 1\n")


@pytest.mark.slow
def test_kill_between_shard_writes_keeps_previous_latest(tmp_path: Path):
    from facescale.checkpoint import CheckpointError, CheckpointManager, resolve_checkpoint

    with pytest.raises(RuntimeError, match="distributed test failed"):
        run_ranks(_save_then_die, 2, str(tmp_path), timeout=300)  # two engines start under load
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    staged = root / "step_00000002.incomplete"  # saves are staged under this name, renamed once COMPLETE
    assert (staged / "head" / "shard-00001-of-00002.pt").is_file()  # it did die mid-save
    assert not (root / "step_00000002").exists()
    assert resolve_checkpoint(tmp_path) == root / "step_00000001"
    assert CheckpointManager(tmp_path, 0, 2).latest() == root / "step_00000001"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(staged)
    message = str(info.value)
    assert "incomplete" in message and "COMPLETE" in message and "state/rank-00001.pt" in message
    assert str(root / "step_00000001") in message  # the hint names the complete step to use instead

    # a complete step dir that lost a file afterwards is refused, naming the file
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "step_00000001", damaged)
    (damaged / "head" / "shard-00000-of-00002.pt").unlink()
    with pytest.raises(CheckpointError, match=r"lacks head/shard-00000-of-00002\.pt"):
        resolve_checkpoint(damaged)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def _load_mismatched(rank: int, world: int, run_dir: str) -> str:
    from facescale.checkpoint import CheckpointError, CheckpointManager

    engine, head = _parts(rank, world)
    CheckpointManager(run_dir, rank, world).save(1, engine, head, {"seed": 0}, "x: 1\n")
    engine, other_head = _parts(rank, world, num_classes=NUM_CLASSES + 1)
    try:
        CheckpointManager(run_dir, rank, world).load(run_dir, engine, other_head)
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


@pytest.mark.slow
def test_mismatched_head_is_refused_with_its_reason(tmp_path: Path):
    messages = run_ranks(_load_mismatched, 1, str(tmp_path))
    assert "num_classes=7 but this rank needs 8" in messages[0], messages
    assert "model.init_from" in messages[0] and "reshard" not in messages[0], messages  # not a world-size fix


def _shard(start: int, count: int, total: int = 5) -> dict:
    rows = torch.arange(start, start + count, dtype=torch.float32)
    return {
        "meta": {
            "num_classes": total,
            "start": start,
            "count": count,
            "embedding_size": 2,
            "optimizer": "adamw",
        },
        "centers": rows[:, None].repeat(1, 2),
        "optimizer": {"exp_avg": -rows[:, None].repeat(1, 2), "row_steps": rows.long()},
        "iteration": 4,
    }


def test_reshard_head_cuts_rows_by_class_partition():
    from facescale.checkpoint import reshard_head
    from facescale.parallel.partition import class_partition

    saved = [_shard(0, 3), _shard(3, 2)]  # class_partition(5, 2, r)
    for world in (1, 2, 3, 4):
        for rank in range(world):
            start, count = class_partition(5, world, rank)
            out = reshard_head(saved, world, rank)
            expected = torch.arange(start, start + count, dtype=torch.float32)
            assert out["meta"]["start"] == start and out["meta"]["count"] == count
            assert torch.equal(out["centers"][:, 0], expected)
            assert torch.equal(out["optimizer"]["exp_avg"][:, 1], -expected)
            assert torch.equal(out["optimizer"]["row_steps"], expected.long())
            assert out["iteration"] == 4


def test_reshard_head_refuses_gaps_and_disagreeing_state():
    from facescale.checkpoint import CheckpointError, reshard_head

    with pytest.raises(CheckpointError, match="a shard is missing"):
        reshard_head([_shard(0, 3)], 2, 0)
    other = _shard(3, 2)
    other["iteration"] = 5
    with pytest.raises(CheckpointError, match="'iteration' is neither per-row nor identical"):
        reshard_head([_shard(0, 3), other], 1, 0)


def test_incomplete_step_dir_names_what_is_missing(tmp_path: Path):
    from facescale.checkpoint import CheckpointError, CheckpointManager, resolve_checkpoint

    step = tmp_path / "checkpoints" / "step_00000004"
    (step / "head").mkdir(parents=True)
    torch.save({}, step / "head" / "shard-00000-of-00003.pt")  # one of three ranks got this far
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(step)
    for name in (
        "head/shard-00001-of-00003.pt",
        "state/rank-00002.pt",
        "trainer.json",
        "backbone",
        "COMPLETE",
    ):
        assert name in str(info.value)
    assert CheckpointManager(tmp_path, 0, 3).latest() is None  # no `latest` yet: a fresh start
    with pytest.raises(CheckpointError, match="no 'latest'"):
        resolve_checkpoint(tmp_path)


def test_the_latest_file_names_its_step_and_other_files_are_refused(tmp_path: Path):
    """`--checkpoint run/checkpoints/latest` (what a user copies from `ls`) used to say it does not exist."""
    import json

    from facescale.checkpoint import CheckpointError, resolve_checkpoint
    from facescale.checkpoint.layout import expected_files
    from facescale.checkpoint.weights import read_backbone_weights

    step = tmp_path / "checkpoints" / "step_00000007"
    for name in expected_files(1, with_deepspeed=False):
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_bytes(b"")
    (step / "trainer.json").write_text(json.dumps({"step": 7, "world_size": 1, "has_deepspeed_files": False}))
    torch.save({"fc.weight": torch.ones(2, 3)}, step / "backbone.pt")
    (step / "COMPLETE").write_text("")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000007\n")
    assert resolve_checkpoint(tmp_path / "checkpoints" / "latest") == step
    assert read_backbone_weights(tmp_path / "checkpoints" / "latest").keys() == {"fc.weight"}
    with pytest.raises(CheckpointError, match="trainer.json' is a file; point at a run directory"):
        resolve_checkpoint(step / "trainer.json")
    (tmp_path / "checkpoints" / "latest").write_text("\n")  # a partial copy of the run directory
    for given in (tmp_path, tmp_path / "checkpoints" / "latest"):
        with pytest.raises(CheckpointError, match="latest' is empty, where it names the newest complete"):
            resolve_checkpoint(given)


@pytest.mark.parametrize(("state", "named"), [
    ([1, 2], "trainer.json: not a JSON object (list)"),
    ({"world_size": 1}, "trainer.json: no step"),
    ({"step": "abc", "world_size": 1}, "trainer.json: step 'abc' is not a whole number >= 0"),
    ({"step": -1, "world_size": 1}, "trainer.json: step -1 is not a whole number >= 0"),
    ({"step": 7}, "trainer.json: no world_size"),
    ({"step": 7, "world_size": True}, "trainer.json: world_size True is not a whole number >= 1"),
    ({"step": 7, "world_size": 0}, "trainer.json: world_size 0 is not a whole number >= 1"),
    ({"step": 7, "world_size": 1, "best_eval": [1, 2]}, "trainer.json: best_eval [1, 2] is not a mapping"),
    ({"step": 7, "world_size": 1, "best_eval": {"lfw": 0.9}}, "best_eval {'lfw': 0.9} is not a mapping"),
])
def test_a_trainer_json_of_the_wrong_shape_is_refused_by_key(tmp_path: Path, capsys, state, named):
    """Resume and export-head read trainer.json's step, world_size and best_eval: a damaged one was a
    KeyError / ValueError / AttributeError traceback, where it is one line naming the file, key and fix."""
    import json

    from facescale.checkpoint import CheckpointError
    from facescale.checkpoint.layout import expected_files, read_trainer_state
    from facescale.cli import main

    step = tmp_path / "checkpoints" / "step_00000007"
    for name in [*expected_files(1, with_deepspeed=False), "COMPLETE"]:
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_bytes(b"")
    (step / "trainer.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="No other complete step directory") as info:
        read_trainer_state(step)
    assert str(step / "trainer.json") in str(info.value) and named in str(info.value)
    assert "the checkpoint is damaged" in str(info.value)
    assert main(["export-head", "--checkpoint", str(step), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err
