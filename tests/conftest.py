"""Fixtures shared by several test modules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch


@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads for the test, the caller's count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch):
    """Set FACESCALE_CPU_FP32_GEMM (heads/gemm.py) for one test (None: unset), with the cached choice
    forgotten around it."""
    from facescale.heads import gemm

    def use(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(gemm.ENV, raising=False)
        else:
            monkeypatch.setenv(gemm.ENV, value)
        gemm.fp32_backend.cache_clear()

    yield use
    gemm.fp32_backend.cache_clear()


@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MiB tmpfs mounted for the test (skipped where mounting needs privileges this user lacks)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
