"""data/hang_guard.py: a blocked read ends the process even while it holds the GIL (as DALI's pipeline build
does on storage that hangs), and overlapping limits keep each other's deadlines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_HOLDS_THE_GIL = """
import ctypes, threading, time
from facescale.data.hang_guard import hang_limit

ticks = []
threading.Thread(target=lambda: [ticks.append(time.sleep(0.05)) for _ in range(1000)], daemon=True).start()
with hang_limit(1.0):
    time.sleep(0.2)
    seen = len(ticks)
    ctypes.PyDLL(None).sleep(3600)  # a C call that keeps the GIL: no Python thread runs any more
print("not reached", seen)
"""

_OVERLAPPING = """
import time
from facescale.data.hang_guard import hang_limit

with hang_limit(3.0):
    with hang_limit(0.5):
        time.sleep(0.1)  # the inner limit ends in time ...
    time.sleep(1.0)  # ... and its earlier deadline does not outlive it: the outer 3 s still hold
with hang_limit(0):
    time.sleep(0.6)  # no limit
print("done")
"""


def _run(code: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_a_read_that_blocks_holding_the_gil_ends_the_process_at_its_limit() -> None:
    proc, took = _run(_HOLDS_THE_GIL)
    assert proc.returncode == 1 and "not reached" not in proc.stdout, proc.stderr
    assert took < 60
    assert proc.stderr.startswith("Timeout (0:00:")  # faulthandler's report of where every thread was:
    assert 'File "<string>", line 10 in <module>' in proc.stderr  # the main one in the blocking C call


def test_overlapping_limits_keep_the_earliest_deadline_in_force_only_while_it_lasts() -> None:
    proc, _ = _run(_OVERLAPPING)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
