"""Fixtures shared by several test modules."""

from __future__ import annotations

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
