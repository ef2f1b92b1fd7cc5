"""benchmarks/step.py at a tiny size, so the script cannot rot: every case builds, steps and is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = {"facescale fp32", "facescale auto", "facescale auto + loader", "facescale auto ZeRO-1", "plain fp32"}


@pytest.mark.slow
def test_step_benchmark_runs_every_case_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "step_tiny"
    argv = ["--models", "demo", "--classes", "2k", "--rounds", "1", "--demo-rounds", "2",
            "--breakdown-steps", "1", "--batch-demo", "8", "--embedding", "64", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    (group,) = report["groups"]
    assert CASES <= set(group["times_s"]), group["times_s"].keys()
    assert all(len(times) == 2 and min(times) > 0 for times in group["times_s"].values())
    assert CASES <= set(group["phases_s"])
    (row,) = report["summary"]
    for key in ("overhead_fp32", "overhead_auto", "overhead_auto_loader", "overhead_auto_zero1"):
        assert -1 < row[key] < 10, (key, row[key])
    text = out.with_suffix(".md").read_text()
    assert "ZeRO-1" in text and "with loader" in text
