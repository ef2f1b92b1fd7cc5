"""End to end: `facescale train` under torchrun on 2 CPU ranks writes TensorBoard scalars and a checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.local import local_train_command
from launcher.ports import free_port

REQUIRED_SCALARS = {
    "train/loss",
    "train/lr",
    "perf/samples_per_s",
    "perf/step_ms",
    "perf/data_wait_ms",
    "perf/max_memory_mb",
    "train/grad_norm",
    "eval/verify/accuracy",
    "eval/verify/pixel_accuracy",
    "head/step_ms",
    "head/num_sampled",
    "head/positive_fraction",
    "data/skipped_samples",
}


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    return out


def _train(shards: Path, run_dir: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    """2 ranks x 8 images: configs/synthetic.yaml with its global batch given per rank (arcface_torch's way),
    which start-up resolves in a schedule line."""
    config = run_dir.parent / "per_rank.yaml"
    text = Path("configs/synthetic.yaml").read_text()
    assert "  global_batch_size: 128\n" in text
    config.write_text(text.replace("  global_batch_size: 128\n", "  batch_per_rank: 8\n"))
    settings = [f"data.shards={shards}", f"eval.bins=[{shards / 'verify.bin'}]", f"logging.run_dir={run_dir}",
                "schedule.steps=4", "schedule.warmup_steps=1",
                "logging.every_steps=2", "eval.every_steps=0", "checkpoint.every_steps=2"]
    cmd = local_train_command(ranks, str(config), settings) + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _event_tags(run_dir: Path) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {kind: set(acc.Tags()[kind]) for kind in ("scalars", "images")}


def _wandb_offline() -> list[str]:
    """W&B in offline mode when the [wandb] extra is installed (it is in [dev], so in CI)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return []
    return ["--set", "logging.wandb.project=facescale-e2e", "--set", "logging.wandb.mode=offline"]


def _check_console(run_dir: Path, proc: subprocess.CompletedProcess) -> None:
    """train.log holds the plan and timestamped window lines; unactionable library warnings are gone."""
    log = (run_dir / "train.log").read_text()
    assert "INFO [plan] world 2 ranks = 1 node(s) x 2 rank(s)" in log and "resumed from no (fresh run)" in log
    assert "INFO [facescale] schedule: global batch 16 = 8 per rank x 2 ranks x 1 accumulation" in log
    assert re.search(r"\d\d:\d\d:\d\d INFO \[train\] step 4/4 epoch [\d.]+ loss [\d.]+ lr .* img/s .*"
                     r"data-wait \d+ ms head \d+ ms elapsed \S+ eta 0s", log), log
    assert "(best " in log
    for noise in ("untested optimizer", "all_gather_into_tensor"):
        assert noise not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_rank_training_writes_events_and_checkpoint(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    wandb = _wandb_offline()
    proc = _train(tiny_shards, run_dir, 2, *wandb, "--set", "eval.every_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _check_console(run_dir, proc)
    if wandb:
        from tests.test_wandb import assert_history_matches_jsonl

        assert_history_matches_jsonl(run_dir, image_keys=frozenset({"eval/verify/roc"}))
    tags = _event_tags(run_dir)
    assert REQUIRED_SCALARS <= tags["scalars"], f"missing scalars: {REQUIRED_SCALARS - tags['scalars']}"
    assert "eval/verify/roc" in tags["images"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step_dir = run_dir / "checkpoints" / latest
    assert latest == "step_00000004" and (step_dir / "COMPLETE").is_file()
    assert sorted(p.name for p in (step_dir / "head").iterdir()) == [
        "shard-00000-of-00002.pt",
        "shard-00001-of-00002.pt",
    ]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 4 and 0.0 <= result["eval"]["verify"]["accuracy"] <= 1.0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "deepspeed.json").is_file()

    # the trained checkpoint evaluates offline, extraction split over 2 ranks, with the same accuracy
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "facescale", "eval", "verify", "--checkpoint", str(run_dir),
           "--bin", str(tiny_shards / "verify.bin"), "--out", str(out)]
    ev = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                        timeout=600)
    assert ev.returncode == 0, ev.stderr[-5000:]
    report = json.loads([line for line in ev.stdout.splitlines() if line.startswith("{")][0])
    assert report["accuracy"] == pytest.approx(result["eval"]["verify"]["accuracy"], abs=1e-6)
    assert (out / "verify_roc.png").is_file(), ev.stdout[-2000:]
    _ijb_two_ranks_equal_one(run_dir, tmp_path)


def _ijb_two_ranks_equal_one(run_dir: Path, tmp_path: Path) -> None:
    """`facescale eval ijb` on a synthetic release: torchrun on 2 ranks (worker processes) == 1 process."""
    from facescale.cli import main
    from facescale.data.synth_faces import render_identity
    from facescale.eval.ijb_synth import write_synthetic_ijb_release

    faces = [face for identity in range(6) for face in render_identity(9, identity, 2, 112)]
    write_synthetic_ijb_release(str(tmp_path / "IJBB"), faces, [i // 2 for i in range(12)], name="ijbb")
    args = ["eval", "ijb", "--checkpoint", str(run_dir), "--root", str(tmp_path / "IJBB"),
            "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "facescale", *args, "--workers", "1",
           "--out", str(tmp_path / "ijb2")]
    ev = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                        timeout=600)
    assert ev.returncode == 0, ev.stderr[-5000:]
    assert "IJBB 1:1 verification, F1 N1 D1" in ev.stdout and "TAR%" in ev.stdout
    two = json.loads([line for line in ev.stdout.splitlines() if line.startswith("{")][0])
    assert main([*args, "--workers", "0", "--out", str(tmp_path / "ijb1")]) == 0
    one = json.loads((tmp_path / "ijb1" / "ijbb_F1N1D1_result.json").read_text())
    assert {k: v for k, v in two.items() if k.startswith("tar")} == \
           {k: v for k, v in one.items() if k.startswith("tar")}
    np.testing.assert_allclose(np.load(two["scores"]), np.load(one["scores"]), atol=1e-6)
    assert Path(two["roc_image"]).is_file() and two["num_impostor"] == 15


@pytest.mark.slow
def test_bad_config_fails_before_process_group(tiny_shards, tmp_path):
    proc = _train(tiny_shards, tmp_path / "bad", 2, "--set", "head.sample_rat=0.2")
    assert proc.returncode != 0
    assert "did you mean 'sample_rate'" in proc.stderr
    assert not (tmp_path / "bad").exists()
