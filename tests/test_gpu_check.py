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


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu_check")  # both engines reuse the synthesized set written here


@pytest.mark.slow
@pytest.mark.parametrize("engine, label", [("direct", "direct, no DeepSpeed"), ("deepspeed", "DeepSpeed")])
def test_dry_run_trains_and_scores_the_held_out_identities(check_dir: Path, engine: str, label: str) -> None:
    argv = ["--dry-run", "--skip", "tests", "head", "--train-engine", engine, "--out", str(check_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    log = (check_dir / "train.log").read_text() if (check_dir / "train.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    (row,) = json.loads((check_dir / "gpu_check.json").read_text())["rows"]
    assert row[:2] == [f"training run ({label})", "ran"], row
    result = json.loads((check_dir / "train" / "result.json").read_text())
    assert result["steps"] == 4
    accuracy = result["eval"]["verify"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and f"held-out accuracy {100 * accuracy:.1f}%" in row[2], row
