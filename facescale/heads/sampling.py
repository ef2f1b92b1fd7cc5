"""Partial FC sampling: per step, keep every positive center of the shard plus uniform random negatives.

Negatives are drawn uniformly without replacement from the shard's non-positive centers, by a generator
seeded from (seed, rank, step, micro-step): ranks and the micro-steps of one gradient-accumulation step draw
independently, and a resumed run re-draws the same samples.
Nothing of size [global batch x shard] or [shard x D] is allocated here; only shard-length score vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facescale.heads.native import center_kernels, native_kernels_for

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64 finaliser: spreads nearby integers (rank, step) to unrelated 64-bit seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, e.g. derive_seed(seed, rank, step)."""
    state = 0
    for part in parts:
        state = _mix64(state ^ (int(part) & _MASK64))
    return state >> 1


def sampling_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """The seed of one rank's draw at one micro-step of one step (salted apart from the center-init streams):
    every micro-step of a gradient-accumulation step draws its own negatives, and micro-step 0 draws what a
    run without accumulation draws."""
    return derive_seed(*((seed, 0x5A3B1E, rank, step) + ((micro,) if micro else ())))


def sampling_generator(
    seed: int, rank: int, step: int, device: torch.device | str = "cpu", micro: int = 0
) -> torch.Generator:
    """A generator seeded with `sampling_seed(seed, rank, step, micro)`."""
    return torch.Generator(device=device).manual_seed(sampling_seed(seed, rank, step, micro))


def num_samples_for(sample_rate: float, count: int) -> int:
    """Centers kept per step on a shard of `count`: int(sample_rate * count); 0 means positives only."""
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"head.sample_rate = {sample_rate!r} must be in [0, 1] (1 = no sampling)")
    return int(sample_rate * count)


@dataclass
class ShardSample:
    """Which local centers take part in this step, and the labels remapped to their columns."""

    index: Tensor | None  # sorted local center ids [C'] (long); None = the whole shard, in order
    target_col: Tensor  # [N] column of each global row's target among the kept centers; -1 = other shard
    positive_count: Tensor  # 0-d: distinct local centers that are targets (on the labels' device)

    @property
    def num_positive(self) -> int:
        """`positive_count` as an int (on CUDA this waits for the device: read it outside the hot path)."""
        return int(self.positive_count)

    @property
    def width(self) -> int | None:
        """Number of kept centers, or None when the whole shard is used."""
        return None if self.index is None else int(self.index.numel())


def sample_centers(
    global_labels: Tensor,
    start: int,
    count: int,
    num_sample: int,
    generator: torch.Generator | int | None,
) -> ShardSample:
    """Choose this shard's centers for one step (see module docstring); num_sample >= count keeps all.

    `generator`: the stream of the draw, or the seed of a fresh generator on the labels' device (on the CPU
    the native kernels then draw that generator's stream themselves, in one call; sampling_seed).

    No host synchronisation unless the budget is below the global batch (only then can the positives
    outnumber it, and their number must be read to size the index)."""
    labels = global_labels.long()
    is_local = (labels >= start) & (labels < start + count)
    local_ids = torch.where(is_local, labels - start, 0)
    slots = torch.where(is_local, local_ids, count)  # rows of other shards mark a spare slot
    positive_count = _distinct_below(slots, count)
    if num_sample >= count:
        return ShardSample(
            index=None, target_col=torch.where(is_local, local_ids, -1), positive_count=positive_count
        )
    if num_sample < labels.numel() and num_sample <= int(positive_count):
        marks = torch.zeros(count + 1, dtype=torch.bool, device=labels.device).index_fill_(0, slots, True)
        index = torch.nonzero(marks[:count]).squeeze(1)  # the positives alone, sorted
    else:
        index = _draw(slots, count, num_sample, generator)
    target_col = torch.where(is_local, torch.searchsorted(index, local_ids), -1)
    return ShardSample(index=index, target_col=target_col, positive_count=positive_count)


def _draw(slots: Tensor, count: int, num_sample: int, generator: torch.Generator | int | None) -> Tensor:
    """Sorted ids of every positive's slot plus the highest-scored negatives, num_sample in all.

    Scores are rand < 1 for the shard's slots (the stream torch.rand(count) draws), then every positive's
    slot and the spare one set to 2.0 so that positives rank above every negative: batch-sized writes, no
    shard-sized mask. From a seed on the CPU, the native kernels draw that same stream and select in one call
    (~2.3x faster than uniform_ and the select at 100k-1M: benchmarks/results/head_parts_sampler_cpu.md)."""
    kernels = center_kernels() if isinstance(generator, int) and slots.device.type == "cpu" else None
    if kernels is not None:
        return kernels.draw_top_k(generator, count, slots, num_sample)
    if isinstance(generator, int):
        generator = torch.Generator(device=slots.device).manual_seed(generator)
    scores = torch.empty(count + 1, device=slots.device)
    scores[:count].uniform_(generator=generator)
    return _top_k_sorted(scores.index_fill_(0, slots, 2.0)[:count], num_sample)


def _distinct_below(slots: Tensor, count: int) -> Tensor:
    """0-d count of the distinct values below `count` in `slots` (the batch's local positives), from the
    batch alone: a sort of N ids rather than a pass over a shard-sized mask."""
    ordered = slots.sort().values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return (first & (ordered < count)).sum()


def _top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Ids of the k highest scores in ascending order. On the CPU one native radix select and an ordered scan
    (ties: lowest ids first), ~4x faster than topk + sort at 100k-1M (benchmarks/results/head_parts_cpu.md);
    elsewhere torch.topk (ties: as it breaks them) and `_sorted`."""
    kernels = native_kernels_for(scores) if scores.device.type == "cpu" else None
    if kernels is not None:
        return kernels.top_k_sorted(scores, k)
    return _sorted(torch.topk(scores, k, sorted=False).indices, scores.numel())


def _sorted(ids: Tensor, count: int) -> Tensor:
    """Distinct ids in [0, count) in ascending order. On the CPU a mark-and-scan over `count` flags is
    1.3-3x faster than a sort (10k-30k of 100k: benchmarks/results/head_parts_cpu.md); the scan's size is
    given (nonzero_static), so it would not wait for a device either; on CUDA the sort is the proven path."""
    if ids.device.type != "cpu":
        return ids.sort().values
    marks = torch.zeros(count, dtype=torch.bool).index_fill_(0, ids, True)
    return torch.nonzero_static(marks, size=ids.numel()).squeeze(1)
