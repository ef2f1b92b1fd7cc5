"""The one definition of how class centers are split across ranks."""

from __future__ import annotations


def class_partition(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Return (start, count) of the contiguous class block owned by `rank`.

    The first `num_classes % world_size` ranks hold one extra center, so shards differ by at most one.
    Used by the head, checkpoints, resharding and the memory planner alike.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    count = base + (1 if rank < extra else 0)
    start = base * rank + min(rank, extra)
    return start, count
