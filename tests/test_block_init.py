"""The block-wise seeded init filled by several threads: same values for any thread count, errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from facescale.f2c.pool import init_pool_rows
from facescale.heads.block_init import INIT_BLOCK_ROWS, fill_blocks, init_center_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "start, count",
    [(0, 6 * INIT_BLOCK_ROWS), (1234, 4 * INIT_BLOCK_ROWS + 77), (3 * INIT_BLOCK_ROWS + 5, 9)],
)
def test_center_init_is_the_same_on_any_number_of_threads(dtype, start, count, two_threads):
    serial = init_center_rows(start, count, 48, 0.01, seed=3, dtype=dtype, threads=1)
    for threads in (2, 3, 16):
        rows = init_center_rows(start, count, 48, 0.01, seed=3, dtype=dtype, threads=threads)
        assert torch.equal(rows, serial)
    assert torch.equal(init_center_rows(start, count, 48, 0.01, seed=3, dtype=dtype), serial)  # torch's count
    assert serial.dtype == dtype and serial.shape == (count, 48)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [8, 100, 512])
def test_center_init_draws_each_block_from_its_own_seeded_normal(dtype, dim):
    """The definition the sharding independence rests on: block b is normal(0, std) from its own generator,
    drawn as one [INIT_BLOCK_ROWS, D] tensor (however the implementation splits the draw)."""
    from facescale.heads.block_init import _INIT_SALT
    from facescale.heads.sampling import derive_seed

    rows = init_center_rows(INIT_BLOCK_ROWS - 300, 600, dim, 0.5, seed=9, dtype=dtype, threads=2)
    for block, (lo, hi) in ((0, (0, 300)), (1, (300, 600))):
        generator = torch.Generator().manual_seed(derive_seed(9, _INIT_SALT, block))
        expected = torch.randn(INIT_BLOCK_ROWS, dim, generator=generator) * 0.5
        picked = expected[-300:] if block == 0 else expected[:300]
        assert torch.equal(rows[lo:hi], picked.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_center_init_allocates_no_block_sized_buffer(dtype):
    """A worker's scratch is one chunk, not a whole block: a block-sized buffer per thread sits above the
    shard at the process's peak memory (8 MB each at D = 512)."""
    from facescale.heads.allocations import LargestAllocation

    with LargestAllocation() as tracker:  # one thread: the mode sees the worker's ops
        rows = init_center_rows(3 * INIT_BLOCK_ROWS + 1000, 9, 64, 0.1, seed=2, dtype=dtype, threads=1)
    assert rows.shape == (9, 64)
    assert 0 < tracker.largest <= INIT_BLOCK_ROWS * 64 // 8


def test_pool_init_is_the_same_on_any_number_of_threads(two_threads):
    parallel = init_pool_rows(100, 3 * 4096 + 11, 16, seed=4)
    torch.set_num_threads(1)
    assert torch.equal(init_pool_rows(100, 3 * 4096 + 11, 16, seed=4), parallel)


def test_fill_blocks_runs_each_block_once_with_one_torch_thread_per_worker(two_threads):
    seen, threads_seen, lock = [], set(), threading.Lock()

    def fill(block: int, scratch: dict) -> None:
        scratch.setdefault("owner", threading.get_ident())
        assert scratch["owner"] == threading.get_ident()  # a worker's scratch is its own
        with lock:
            seen.append(block)
            threads_seen.add(torch.get_num_threads())

    fill_blocks(range(5, 12), fill, threads=3)
    assert sorted(seen) == list(range(5, 12))
    assert threads_seen == {1}
    assert torch.get_num_threads() == 2


def test_fill_blocks_raises_a_fill_error_and_restores_the_thread_count(two_threads):
    def fill(block: int, scratch: dict) -> None:
        if block == 4:
            raise ValueError("block 4 is bad")

    with pytest.raises(ValueError, match="block 4 is bad"):
        fill_blocks(range(8), fill, threads=2)
    assert torch.get_num_threads() == 2
