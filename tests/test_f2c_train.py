"""End to end: `facescale train` with head.type f2c on 2 CPU ranks logs the pool scalars, saves the pool and
G-Net with the checkpoint, resumes from it, and skips a step whose loss is not finite (loss guard)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from launcher.local import local_train_command

HEAD_SCALARS = {
    "head/pool_fill",
    "head/pooled_probe_fraction",
    "head/outlier_loss",
    "head/classification_loss",
}


def _train(shards: Path, run_dir: Path, steps: int, nan_steps: str = "", every: int = 2, ranks: int = 2,
           pool: str = "replicated", zero_stage: int = 1) -> subprocess.CompletedProcess:
    sets = [
        f"data.shards={shards}",
        "eval.bins=[]",
        f"logging.run_dir={run_dir}",
        f"schedule.steps={steps}",
        "schedule.warmup_steps=1",
        "schedule.global_batch_size=16",
        "head.f2c.queue_size=32",
        "head.f2c.identities_per_rank=0",
        f"head.f2c.pool={pool}",
        "logging.every_steps=1",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=10",
        "data.reader=webdataset",
        "data.num_workers=0",
        f"deepspeed.zero_stage={zero_stage}",
    ]
    cmd = local_train_command(ranks, "configs/synthetic_f2c.yaml", sets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FACESCALE_INJECT_NAN_STEPS": nan_steps}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_dcp_training_logs_pool_scalars_checkpoints_and_resumes(tmp_path):
    from facescale.data.synth import synthesize

    shards = tmp_path / "synth"
    synthesize(shards, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    run_dir = tmp_path / "run"
    first = _train(shards, run_dir, steps=2)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {key for row in rows for key in row}
    assert HEAD_SCALARS <= logged
    fill = [row["head/pool_fill"] for row in rows if "head/pool_fill" in row]
    assert 0 < fill[-1] <= 1
    shard = torch.load(run_dir / "checkpoints/step_00000002/head/shard-00001-of-00002.pt", weights_only=False)
    assert shard["iteration"] == 2 and shard["meta"]["queue_size"] == 32
    assert int((shard["pool"]["slot_label"] >= 0).sum()) > 0 and shard["gallery_net"]
    second = _train(shards, run_dir, steps=4, nan_steps="2", every=1)  # 0-based step 2: the third step
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert "step 3: non-finite loss or gradient, update skipped" in second.stdout + second.stderr
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("train/skipped_steps", 0) for row in rows) == 1
    before, after = (torch.load(run_dir / f"checkpoints/step_0000000{n}/backbone.pt", weights_only=False)
                     for n in (2, 3))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_sharded_pool_resumes_on_another_world_size(tmp_path):
    from facescale.data.synth import synthesize
    from facescale.f2c.head import label_owner

    shards = tmp_path / "synth"
    synthesize(shards, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    run_dir = tmp_path / "run"
    # stage 0 here (the overlapped all-reduce at 2 ranks, no self-reduction at 1); the test above runs stage 1
    first = _train(shards, run_dir, steps=2, pool="sharded", zero_stage=0)
    assert first.returncode == 0, first.stderr[-3000:]
    step2 = run_dir / "checkpoints/step_00000002/head"
    saved = [torch.load(step2 / f"shard-0000{r}-of-00002.pt", weights_only=False) for r in range(2)]
    pooled = {int(label) for s in saved for label in s["pool"]["slot_label"].tolist() if label >= 0}
    assert pooled
    second = _train(shards, run_dir, steps=3, pool="sharded", ranks=1, zero_stage=0)  # 2 ranks -> 1 rank
    assert second.returncode == 0, second.stderr[-3000:]
    assert "saved by 2 ranks" in second.stdout + second.stderr
    step3 = run_dir / "checkpoints/step_00000003/head"
    resumed = torch.load(step3 / "shard-00000-of-00001.pt", weights_only=False)
    assert resumed["meta"]["world_size"] == 1 and resumed["iteration"] == 3
    labels = resumed["pool"]["slot_label"]
    assert pooled <= {int(label) for label in labels.tolist()}  # 32 slots hold every identity seen so far
    assert bool((label_owner(labels[labels >= 0], 1) == 0).all())
