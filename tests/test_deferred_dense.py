"""Deferred dense updates: the head that replays unsampled rows' missed steps on demand is bit for bit the
head that streams every row every step (fp32 and bf16 storage, with and without momentum, a changing
learning rate, gradient accumulation, a save and load in between, and an lr history shorter than the run)."""

from __future__ import annotations

import pytest
import torch

from facescale.config.schema import MarginConfig
from facescale.heads.deferred_dense import DeferredDense
from facescale.heads.margins import build_margin
from facescale.heads.native import center_kernels
from facescale.heads.partial_fc import PartialFCHead

needs_kernels = pytest.mark.skipif(center_kernels() is None, reason="needs a C++ compiler for the kernels")
ROWS, DIM, BATCH = 600, 32, 12


def _head(dtype: torch.dtype, momentum: float, deferred: bool, history: int, dim: int = DIM) -> PartialFCHead:
    head = PartialFCHead(ROWS, dim, build_margin(MarginConfig()), seed=4, sample_rate=0.05, update="dense",
                         momentum=momentum, weight_decay=0.01, storage_dtype=dtype)
    optimizer = head.center_optimizer
    optimizer.block_rows = 16
    optimizer.deferred = DeferredDense(ROWS, history) if deferred else None
    return head


def _train(head: PartialFCHead, steps: range, dtype: torch.dtype, accumulate: int = 1) -> None:
    dim = head.embedding_size
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        for micro in range(accumulate):
            x = torch.randn(BATCH, dim, generator=gen).to(dtype).requires_grad_()
            y = torch.randint(0, ROWS, (BATCH,), generator=gen)
            loss, _ = head(x, y, step, micro)
            loss.backward()
        head.optimizer_step(0.5 * (1 - step / 40))  # a decaying lr: each replayed step needs its own


def _assert_same(a: PartialFCHead, b: PartialFCHead) -> None:
    assert torch.equal(a.centers, b.centers)
    state_a, state_b = a.center_optimizer.state_tensors(), b.center_optimizer.state_tensors()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert torch.equal(a._center_inv_norms(), b._center_inv_norms())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("dim", [DIM, 136])  # 136: whole register-held replay chunks (64 or 128) + a tail
def test_deferred_dense_equals_the_every_step_pass_bit_for_bit(dtype, momentum, accumulate, dim) -> None:
    every_step, deferred = (_head(dtype, momentum, d, history=8, dim=dim) for d in (False, True))
    _train(every_step, range(20), dtype, accumulate)
    _train(deferred, range(20), dtype, accumulate)
    # it really deferred: some rows have not been written since long before the last step
    steps = deferred.center_optimizer.deferred.row_steps
    assert deferred.center_optimizer.deferred.lagging and int(steps.min()) < int(steps.max())
    assert not torch.equal(deferred.center_rows, every_step.center_rows)
    _assert_same(every_step, deferred)  # reading `centers` brings every row up to date


@needs_kernels
def test_a_saved_and_reloaded_deferred_head_continues_bit_for_bit() -> None:
    straight, resumed = (_head(torch.float32, 0.9, True, history=1024) for _ in range(2))
    _train(straight, range(12), torch.float32)
    _train(resumed, range(6), torch.float32)
    state = resumed.state_dict()
    fresh = _head(torch.float32, 0.9, True, history=1024)
    fresh.load_state_dict(state)
    _train(fresh, range(6, 12), torch.float32)
    _assert_same(straight, fresh)
