"""The kernels' worker team (kernels/common.h): threads kept across calls, a caller that finds the team
busy forks its own, and a forked child starts a team of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from facescale.heads.native import center_kernels

pytestmark = pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the fused path is off")


def _team_threads() -> int:
    return sum(
        (task / "comm").read_text().strip() == "facescale-team" for task in Path("/proc/self/task").iterdir()
    )


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_calls_reuse_one_team_of_the_budget_size(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    source, index = torch.randn(4000, 64), torch.randperm(4000)
    out = torch.empty(4000, 64)
    center_kernels().gather_rows(source, index, out)
    team = _team_threads()  # 3 threads: the caller and at least two workers (a team only grows)
    for _ in range(20):
        center_kernels().gather_rows(source, index, out)
    assert torch.equal(out, source[index])
    assert team >= 2 and _team_threads() == team  # started once, not per call


def test_concurrent_callers_get_the_same_results_as_one_caller(monkeypatch) -> None:
    """ctypes releases the GIL, so Python threads call the kernels at once: all but one find the team busy
    and fork threads of their own; every result must equal torch's."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(3000, 96, generator=gen)
    cases = [torch.randperm(3000, generator=gen)[:2000] for _ in range(4)]
    logits = [torch.randn(64, 700, generator=gen) for _ in range(4)]
    failures: list[str] = []

    def work(k: int) -> None:
        out, rows = torch.empty(2000, 96), logits[k].clone()
        row_max = torch.empty(64)
        for _ in range(30):
            if not torch.equal(center_kernels().gather_rows(source, cases[k], out), source[cases[k]]):
                failures.append(f"gather {k}")
            center_kernels().scale_row_max_(rows.copy_(logits[k]), 2.0, torch.full((64,), -1), row_max)
            if not (torch.equal(rows, logits[k] * 2.0) and torch.equal(row_max, rows.amax(dim=1))):
                failures.append(f"row max {k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a kernel call hung"
    assert not failures


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_runs_threaded_kernels_with_a_team_of_its_own() -> None:
    """The parent's workers do not exist in a fork()ed child: its kernels must run, not wait for them."""
    script = textwrap.dedent(
        """
        import os, signal, torch
        torch.set_num_threads(2)
        from facescale.heads.native import center_kernels
        source, index = torch.randn(5000, 64), torch.randperm(5000)
        out = torch.empty(5000, 64)
        center_kernels().gather_rows(source, index, out)  # the parent's team starts here
        pid = os.fork()
        if pid == 0:
            signal.alarm(100)  # a hung child ends itself (the test's timeout only ends its parent)
            gather = center_kernels().gather_rows
            ok = all(torch.equal(gather(source, index, out), source[index]) for _ in range(5))
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "child 0" in done.stdout
