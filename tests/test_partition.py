"""class_partition: contiguous, disjoint, covering shards that differ by at most one class."""

from __future__ import annotations

import pytest

from facescale.parallel.partition import class_partition


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7, 8, 16, 64])
@pytest.mark.parametrize("num_classes", [0, 1, 3, 7, 10, 93_431, 2_059_906])
def test_shards_cover_all_classes_exactly_once(num_classes: int, world: int) -> None:
    shards = [class_partition(num_classes, world, rank) for rank in range(world)]
    next_start = 0
    for start, count in shards:  # contiguous and in rank order => disjoint, no gaps
        assert start == next_start and count >= 0
        next_start = start + count
    assert next_start == num_classes
    counts = [count for _, count in shards]
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the extra classes go to the first ranks


def test_uneven_example_matches_insightface_layout() -> None:
    # WebFace42M on 8 ranks: ranks 0-1 hold 257,489 classes, the rest 257,488; rank 2 starts at 514,978
    assert class_partition(2_059_906, 8, 0) == (0, 257_489)
    assert class_partition(2_059_906, 8, 2) == (514_978, 257_488)
    assert class_partition(10, 4, 3) == (8, 2)
    assert class_partition(3, 4, 3) == (3, 0)  # more ranks than classes: the last shard is empty


@pytest.mark.parametrize("args", [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)])
def test_rejects_bad_arguments(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        class_partition(*args)
