"""Huge-page advice for shard-sized CPU buffers: the advised range is the tensor's 2 MB-aligned interior, the
kernel records it on that mapping (VmFlags `hg` in /proc/self/smaps), and the values are ordinary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from facescale.heads.center_optimizer import CenterOptimizer
from facescale.heads.huge_pages import HUGE_PAGE_BYTES, empty_rows, zeros_rows
from facescale.heads.partial_fc import init_center_rows

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> set[str]:
    """VmFlags of the mapping of this process that contains `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(part, 16) for part in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _interior(tensor: torch.Tensor) -> int:
    """An address inside the tensor's first whole 2 MB page."""
    return -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + 4096


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _THP.exists(), reason="needs Linux THP")
def test_shard_buffers_are_advised_huge_and_small_ones_are_not() -> None:
    big = empty_rows((4096, 512), torch.float32)  # 8 MB
    assert "hg" in _vm_flags(_interior(big))
    momentum = CenterOptimizer(4096, 512, mode="sparse").momentum_buffer
    assert "hg" in _vm_flags(_interior(momentum)) and torch.count_nonzero(momentum) == 0
    centers = init_center_rows(0, 4096, 512, 0.01, seed=0)
    assert "hg" in _vm_flags(_interior(centers))
    small = empty_rows((16, 512), torch.float32)  # 32 KB: no whole huge page, left alone
    assert small.shape == (16, 512)


def test_values_are_ordinary_tensors() -> None:
    zeros = zeros_rows((3000, 700), torch.bfloat16)
    assert zeros.dtype == torch.bfloat16 and zeros.is_contiguous() and not zeros.any()
    zeros[2999, 699] = 1.5
    assert float(zeros.sum()) == 1.5
