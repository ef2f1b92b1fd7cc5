"""A verification set that stops being readable during a run is skipped with a warning; training goes on.

It used to end the run at the evaluation (exit 2), losing every step since the last checkpoint; with
`checkpoint.every_steps` equal to `eval.every_steps` the evaluation ran first, so not even that step was
saved.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from facescale.eval.binfile import read_bin, write_bin
from launcher.local import local_train_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("eval_skip")
    synthesize(out, identities=12, images_per_identity=4, holdout_identities=6, seed=8, verify_pairs=40,
               workers=1)
    return out


@pytest.mark.slow
def test_a_set_that_breaks_mid_run_is_skipped_on_both_ranks_and_the_run_finishes(shards, tmp_path) -> None:
    images, issame = read_bin(shards / "verify.bin")
    broken = list(images)
    broken[-3] = b"\xff\xd8 not a jpeg any more"  # rank 1's half; the start-up check decodes only the ends
    bad = write_bin(tmp_path / "cfp.bin", broken, issame)
    run_dir = tmp_path / "run"
    cmd = local_train_command(2, "configs/synthetic.yaml", [
        f"data.shards={shards}", "data.num_workers=0", f"eval.bins=[{bad},{shards / 'verify.bin'}]",
        "eval.every_steps=2", "eval.batch_size=16", f"logging.run_dir={run_dir}", "schedule.steps=4",
        "schedule.warmup_steps=0", "schedule.global_batch_size=16", "checkpoint.every_steps=2",
    ])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    for step in (2, 4):
        assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
        # rank 1, whose slice holds the broken image, names it; rank 0 (console, train.log) says what happens
        assert f"[eval] rank 1: step {step}: {bad}: image {len(images) - 3} could not be decoded" in out
        skipped = (f"[eval] step {step}: skipped {bad} (embedding extraction failed on rank(s) [1]; see that "
                   "rank's error); training goes on")
        assert skipped in out and skipped in (run_dir / "train.log").read_text()
        assert f"[eval] step {step} verify: accuracy" in out  # the other set is still evaluated
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval_skipped"] == {str(bad): 4} and list(result["eval"]) == ["verify"]
