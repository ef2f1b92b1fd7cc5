"""benchmarks/gpu_check.py's training run in its --dry-run form, both engines, so the script that waits
for a GPU cannot rot: a run on the GPU machine has no second try (its time is short)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


RESULT_FILES = {"summary.md", "gpu_check.json", "gpu_check.log", "pytest.log", "head.md", "head.log",
                "train.log", "result.json"}


def _check(result_json: Path, row: list, engine_label: str) -> None:
    assert row[:2] == [f"training run ({engine_label})", "ran"], row
    result = json.loads(result_json.read_text())
    assert result["steps"] == 4
    accuracy = result["eval"]["verify"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and f"held-out accuracy {100 * accuracy:.1f}%" in row[2], row


@pytest.mark.slow
def test_dry_run_without_deepspeed_trains_and_scores_the_held_out_identities(tmp_path: Path) -> None:
    check_dir = tmp_path / "gpu_check"
    argv = ["--dry-run", "--skip", "tests", "head", "--train-engine", "direct", "--out", str(check_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    log = (check_dir / "train.log").read_text() if (check_dir / "train.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    (row,) = json.loads((check_dir / "gpu_check.json").read_text())["rows"]
    _check(check_dir / "train" / "result.json", row, "direct, no DeepSpeed")


@pytest.mark.slow
def test_the_one_command_wrapper_runs_facescale_train_and_brings_back_its_files(tmp_path: Path) -> None:
    """benchmarks/gpu_check_here.sh as a GPU session runs it, with no wheels to install (an empty folder)."""
    results, wheels = tmp_path / "results", tmp_path / "no_wheels"
    wheels.mkdir()
    env = dict(os.environ, GPU_PYTHON=sys.executable, GPU_WHEELS=str(wheels), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check_here.sh"), str(results), "--dry-run",
                           "--skip", "tests", "head", "--train-engine", "deepspeed"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    log = (results / "train.log").read_text() if (results / "train.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    present = {path.name for path in results.iterdir()}
    assert present <= RESULT_FILES and {"summary.md", "gpu_check.json", "result.json"} <= present, present
    (row,) = json.loads((results / "gpu_check.json").read_text())["rows"]
    _check(results / "result.json", row, "DeepSpeed")
