"""Importing facescale first sets OpenMP's idle workers to sleep (OMP_WAIT_POLICY=PASSIVE) before torch loads
its OpenMP runtime, unless the user chose a policy: the head's own kernel threads must not be time-sliced
against spinning workers (facescale/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys, os; import facescale; loaded = 'torch' in sys.modules; import torch; "
    "print(loaded, os.environ.get('OMP_WAIT_POLICY'))"
)


def _probe(**extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(REPO), **extra)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_passive_is_set_before_torch_loads() -> None:
    assert _probe() == "False PASSIVE"


def test_a_policy_the_user_set_is_kept() -> None:
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "False ACTIVE"
