"""Exact resume and the loss guard, end to end under torchrun on 2 CPU ranks (Partial FC, sampling 10%).

One uninterrupted reference run and one run SIGKILLed (whole process group, no warning) once a checkpoint
exists, then resumed from `latest`. Both runs get NaN injected into the loss at 0-based steps 2, 5 and 6
with `checkpoint.max_bad_steps=1`: step 2 is skipped and training goes on; 5 and 6 are two in a row, so the
run stops after step 7 with a checkpoint and a clear message. The resumed run must log the same loss at
every step and end with bit-identical backbone weights, head shards and optimizer state; the skipped steps
must leave weights untouched and be counted in TensorBoard as `train/skipped_steps`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher.local import local_train_command

REPO = Path(__file__).resolve().parents[1]
STEPS = 7
NAN_STEPS = "2,5,6"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("resume_synth")
    synthesize(out, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    return out


def _start(shards: Path, run_dir: Path) -> subprocess.Popen:
    cmd = local_train_command(2, "configs/synthetic.yaml", [
        f"data.shards={shards}",
        "data.num_workers=1",
        "eval.bins=[]",
        f"logging.run_dir={run_dir}",
        f"schedule.steps={STEPS}",
        "schedule.warmup_steps=1",
        "schedule.global_batch_size=16",  # 6 steps per epoch: the run crosses an epoch boundary
        "logging.every_steps=1",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
        "checkpoint.max_bad_steps=1",
    ])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "FACESCALE_INJECT_NAN_STEPS": NAN_STEPS,
    }
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the agent and every worker (torchrun starts each worker in a session of its own)."""
    import psutil

    agent = psutil.Process(proc.pid)
    victims = [*agent.children(recursive=True), agent]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def _finish(proc: subprocess.Popen, run_dir: Path) -> str:
    proc.wait(timeout=400)
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert proc.returncode != 0, "the loss guard should have stopped the run:\n" + log[-3000:]
    assert "steps 6-7 had a non-finite loss or gradient, more than checkpoint.max_bad_steps = 1" in log, \
        log[-5000:]
    return log


def _losses(run_dir: Path) -> dict[int, float]:
    """The logged loss of every step (a resumed run sets aside the lines of the steps it repeats)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def _files(step_dir: Path) -> dict[str, object]:
    names = [
        "backbone.pt",
        "backbone_optim.pt",
        "head/shard-00000-of-00002.pt",
        "head/shard-00001-of-00002.pt",
    ]
    return {n: torch.load(step_dir / n, weights_only=False) for n in names}


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_resume_and_nan_guard_match_uninterrupted_run(shards: Path, tmp_path: Path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref_proc = _start(shards, reference)
    _finish(ref_proc, reference)

    proc = _start(shards, killed)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    _kill_tree(proc)
    killed_at = latest.read_text().strip()
    assert killed_at < f"step_{STEPS:08d}", "the run finished before the kill"
    resumed_log = _finish(_start(shards, killed), killed)
    assert "resumed from" in resumed_log
    # train.log continues across the restart: two start-up plans, the second naming the checkpoint
    train_log = (killed / "train.log").read_text()
    assert train_log.count("[plan] run dir") == 2 and f"resumed from {latest.parent / killed_at}" in train_log

    ref_losses, losses = _losses(reference), _losses(killed)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    for step, value in ref_losses.items():
        same = value == losses[step] or (math.isnan(value) and math.isnan(losses[step]))
        assert same, f"step {step}: reference loss {value}, resumed {losses[step]} (killed at {killed_at})"
    assert [s for s, v in ref_losses.items() if math.isnan(v)] == [3, 6, 7]  # logged after 0-based 2, 5, 6
    _assert_same(
        _files(reference / "checkpoints" / "step_00000007"),
        _files(killed / "checkpoints" / "step_00000007"),
        "final",
    )

    ckpt = reference / "checkpoints"
    _assert_same(_files(ckpt / "step_00000002"), _files(ckpt / "step_00000003"), "skipped step 2")
    _assert_same(_files(ckpt / "step_00000005"), _files(ckpt / "step_00000007"), "skipped steps 5, 6")
    changed = _files(ckpt / "step_00000004")["backbone.pt"]
    assert any(
        not torch.equal(v, _files(ckpt / "step_00000003")["backbone.pt"][k]) for k, v in changed.items()
    )
    skipped = [
        json.loads(x).get("train/skipped_steps")
        for x in (reference / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(v for v in skipped if v is not None) == 3
    trainer = json.loads((ckpt / "step_00000007" / "trainer.json").read_text())
    assert trainer["skipped_steps"] == 3 and trainer["bad_steps_in_row"] == 2


def _run_dcp(shards: Path, run_dir: Path) -> str:
    cmd = local_train_command(2, "configs/synthetic_f2c.yaml", [
        f"data.shards={shards}",
        "eval.bins=[]",
        f"logging.run_dir={run_dir}",
        "schedule.steps=4",
        "schedule.warmup_steps=1",
        "schedule.global_batch_size=16",
        "logging.every_steps=1",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        "head.f2c.queue_size=32",
        "head.f2c.identities_per_rank=4",
    ])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_dcp_resume_matches_uninterrupted_run(shards: Path, tmp_path: Path):
    """F2C mode: resuming from step 2 (as after a kill right after that checkpoint) reproduces steps 3-4."""
    import shutil

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run_dcp(shards, reference)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    log = _run_dcp(shards, resumed)
    assert "resumed from" in log and "cannot restore its position" not in log  # cursor, no re-decoding
    ref_losses, losses = _losses(reference), _losses(resumed)
    assert sorted(losses) == [3, 4] and all(losses[s] == ref_losses[s] for s in (3, 4)), (ref_losses, losses)
    for name in (
        "backbone.pt",
        "backbone_optim.pt",
        "head/shard-00000-of-00002.pt",
        "head/shard-00001-of-00002.pt",
    ):
        a = torch.load(reference / "checkpoints" / "step_00000004" / name, weights_only=False)
        b = torch.load(resumed / "checkpoints" / "step_00000004" / name, weights_only=False)
        _assert_same(a, b, name)
