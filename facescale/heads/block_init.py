"""Seeded random init drawn per fixed global block, the blocks filled by several threads at once.

Each block of rows has its own generator, seeded from its global index, so a shard's values do not depend on
how the classes are sharded. That also makes the blocks independent: torch's CPU generator fills one tensor
on one thread (~150k rows of 512 a second here, over a minute for a 10M-row shard), so the blocks are
spread over threads instead. The values are the same for any thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from facescale.heads.cpu_threads import small_ops_serial
from facescale.heads.huge_pages import empty_rows
from facescale.heads.sampling import derive_seed

INIT_BLOCK_ROWS = 4096  # fixed global blocks of centers: the full matrix is world-size independent
_INIT_SALT = 0x1C3A7
INIT_CHUNK_ROWS = 256  # where a block is not drawn straight into its rows, it is drawn in chunks this size


def fill_blocks(blocks: Sequence[int], fill: Callable[[int, dict], None], threads: int | None = None) -> None:
    """fill(block, scratch) for every block, on up to `threads` threads (default: torch's thread count).

    Each thread takes a contiguous run of blocks and its own `scratch` dict (for buffers it reuses across
    its blocks). While they run, torch is held to one thread (`small_ops_serial`), so the fills' own ops do
    not start a nested OpenMP team each; the count is restored afterwards. A fill's first error is raised."""
    workers = max(1, min(len(blocks), threads or torch.get_num_threads()))

    def run(part: Sequence[int]) -> None:
        scratch: dict = {}
        for block in part:
            fill(block, scratch)

    if workers == 1:
        run(blocks)
        return
    parts = [blocks[len(blocks) * i // workers : len(blocks) * (i + 1) // workers] for i in range(workers)]
    with small_ops_serial(torch.device("cpu")):  # the workers' torch ops: one thread each
        with ThreadPoolExecutor(workers, thread_name_prefix="facescale-init") as pool:
            for future in [pool.submit(run, part) for part in parts]:
                future.result()


def init_center_rows(
    start: int,
    count: int,
    dim: int,
    std: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> Tensor:
    """normal(0, std) rows [start, start+count) of the global [C, D] init; same values for any sharding and
    any `threads` (default: torch's thread count).

    A fixed global block is drawn in fp32 straight into its rows when it lies whole in an fp32 shard,
    otherwise chunk by chunk into one small buffer per thread (torch's normal draws a tensor's values in
    order, so consecutive chunks of 256 rows give the block's values bit for bit; the tests pin it): no
    temporary per block, which the C allocator would keep resident, and no block-sized buffer per thread
    (8 MB each at D = 512, above the shard at the process's peak)."""
    out = empty_rows((count, dim), dtype)  # huge pages on the CPU (heads/huge_pages.py)
    stop = start + count

    def fill(block: int, scratch: dict) -> None:
        generator = torch.Generator().manual_seed(derive_seed(seed, _INIT_SALT, block))
        base = block * INIT_BLOCK_ROWS
        lo, hi = max(start, base), min(stop, base + INIT_BLOCK_ROWS)
        if dtype == torch.float32 and hi - lo == INIT_BLOCK_ROWS:
            torch.randn(INIT_BLOCK_ROWS, dim, generator=generator, out=out[lo - start : hi - start]).mul_(std)
            return
        if "chunk" not in scratch:
            scratch["chunk"] = torch.empty(INIT_CHUNK_ROWS, dim)
        for first in range(base, hi, INIT_CHUNK_ROWS):  # the chunks before `lo` only advance the generator
            values = torch.randn(INIT_CHUNK_ROWS, dim, generator=generator, out=scratch["chunk"])
            a, b = max(lo, first), min(hi, first + INIT_CHUNK_ROWS)
            if a < b:
                out[a - start : b - start] = values[a - first : b - first].mul_(std)

    fill_blocks(range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)), fill, threads)
    return out
