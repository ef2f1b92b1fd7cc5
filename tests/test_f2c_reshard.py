"""Resharding a sharded Dynamic Class Pool: every pooled identity moves to its owner at the new world size
with both feature rows, its row pointer and its place in the LRU order; capacity limits keep the newest."""

from __future__ import annotations

import pytest
import torch

from facescale.checkpoint.layout import CheckpointError
from facescale.checkpoint.reshard import reshard_head
from facescale.f2c.head import label_owner
from facescale.f2c.pool import ClassPool, init_pool_rows
from facescale.parallel.partition import class_partition

Q, DIM, SEED = 24, 4, 5


def _saved_shards(world: int, sightings: list[list[int]]) -> list[dict]:
    """A sharded pool of Q slots at `world` ranks after committing `sightings` (one gathered batch each)."""
    shards = []
    for rank in range(world):
        start, count = class_partition(Q, world, rank)
        pool = ClassPool(count, DIM, seed=SEED, first_slot=start)
        for step, batch in enumerate(sightings):
            labels = torch.tensor(batch)
            own = label_owner(labels, world) == rank
            features = torch.nn.functional.normalize(
                torch.randn(len(batch), DIM, generator=torch.Generator().manual_seed(step)), dim=1)
            pool.insert(features[own], labels[own], commit=True)
        meta = {"queue_size": Q, "pool_mode": "sharded", "world_size": world, "rank": rank, "slots": count,
                "embedding_size": DIM}
        shards.append({"meta": meta, "pool": pool.pool_state(), "gallery_net": {"w": torch.ones(2)},
                       "iteration": len(sightings)})
    return shards


def _by_label(shards: list[dict]) -> dict[int, tuple[torch.Tensor, int]]:
    out = {}
    for shard in shards:
        pool = shard["pool"]
        for slot, label in enumerate(pool["slot_label"].tolist()):
            if label >= 0:
                out[label] = (pool["features"][:, slot], int(pool["row_ptr"][slot]))
    return out


def _lru(shard: dict) -> list[int]:
    pool = shard["pool"]
    used = pool["slot_label"] >= 0
    return pool["slot_label"][used][torch.argsort(pool["last_seen"][used])].tolist()


def _age_order(shards: list[dict]) -> dict[int, int]:
    """label -> age (saving shard's clock minus the label's stamp)."""
    ages = {}
    for shard in shards:
        pool = shard["pool"]
        for slot, label in enumerate(pool["slot_label"].tolist()):
            if label >= 0:
                ages[label] = int(pool["clock"]) - int(pool["last_seen"][slot])
    return ages


SIGHTINGS = [[3, 7, 11, 3], [20, 21, 7], [40, 41, 42, 43, 3], [5, 6, 50, 51, 52]]


@pytest.mark.parametrize("new_world", [1, 3, 2])
def test_every_identity_moves_to_its_new_owner_with_rows_and_recency(new_world):
    saved = _saved_shards(2, SIGHTINGS)
    before, ages = _by_label(saved), _age_order(saved)
    assert len(before) == len({label for batch in SIGHTINGS for label in batch})
    new = [reshard_head(saved, new_world, rank) for rank in range(new_world)]
    assert _by_label(new).keys() == before.keys()  # Q is large enough: nothing dropped
    for rank, shard in enumerate(new):
        start, count = class_partition(Q, new_world, rank)
        pool = shard["pool"]
        assert shard["meta"] == {**saved[0]["meta"], "world_size": new_world, "rank": rank, "slots": count}
        assert pool["features"].shape == (2, count, DIM) and pool["first_slot"] == start
        labels = pool["slot_label"][pool["slot_label"] >= 0]
        assert bool((label_owner(labels, new_world) == rank).all())
        for label, (rows, pointer) in _by_label([shard]).items():
            assert torch.equal(rows, before[label][0]) and pointer == before[label][1]
        lru = _lru(shard)
        assert [ages[label] for label in lru] == sorted((ages[label] for label in lru), reverse=True)
        empty = pool["slot_label"] < 0  # empty slots: a fresh pool's rows, filled before any eviction
        fresh = init_pool_rows(start, count, DIM, SEED)
        assert torch.equal(pool["features"][:, empty], fresh[:, empty])
        assert bool((pool["last_seen"][empty] < 0).all()) and bool((pool["last_seen"][~empty] >= 0).all())
        # the resharded state loads into a pool of that shape and keeps working
        live = ClassPool(count, DIM, seed=SEED, first_slot=start)
        live.load_pool_state(pool)
        live.insert(torch.nn.functional.normalize(torch.ones(1, DIM), dim=1), torch.tensor([99]), commit=True)


def test_a_full_shard_keeps_its_newest_identities():
    many = [[label] for label in range(0, 200, 1)]  # 200 sightings, one label each, oldest first
    saved = _saved_shards(4, many)  # each of 4 shards keeps its newest 6
    new = reshard_head(saved, 1, 0)
    kept = set(new["pool"]["slot_label"].tolist())
    pooled = _age_order(saved)
    newest = sorted(pooled, key=lambda label: (pooled[label], label))[:Q]
    assert kept == set(newest) and len(kept) == Q


def test_pools_saved_without_their_seed_are_refused():
    saved = _saved_shards(2, SIGHTINGS)
    for shard in saved:
        del shard["pool"]["init_seed"]
    with pytest.raises(CheckpointError, match="init seed"):
        reshard_head(saved, 3, 0)
