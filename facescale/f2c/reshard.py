"""Re-cut a sharded Dynamic Class Pool for another world size (resume of `head.f2c.pool: sharded` on W').

A sharded pool keeps each label on rank `label_owner(label, W)` with an LRU of its own, so a pool saved at W
ranks has no exact counterpart at W'. This carries over what matters: every pooled identity moves, with both
feature rows and its row pointer, to its owner at W'; its recency is its age (the saving shard's clock minus
its stamp, comparable because the hash spreads sightings evenly over shards). A new shard keeps its most
recent identities when more arrive than it has slots (`class_partition(Q, W', rank)`); the rest of its
slots are empty, with the features a fresh pool has there. G-Net and the iteration count are copied.
"""

from __future__ import annotations

from typing import Any

import torch

from facescale.errors import InputError
from facescale.f2c.head import label_owner
from facescale.f2c.pool import init_pool_rows
from facescale.parallel.partition import class_partition


class PoolReshardError(InputError, ValueError):
    """The saved shards are not one consistent sharded pool."""


def _pooled(shards: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pooled identities of all shards: (labels, ages, features [2, n, D], row pointers)."""
    labels, ages, features, pointers = [], [], [], []
    for shard in shards:
        pool = shard["pool"]
        used = pool["slot_label"] >= 0
        labels.append(pool["slot_label"][used])
        ages.append(int(pool["clock"]) - pool["last_seen"][used])
        features.append(pool["features"][:, used])
        pointers.append(pool["row_ptr"][used])
    return torch.cat(labels), torch.cat(ages), torch.cat(features, dim=1), torch.cat(pointers)


def reshard_pool(shards: list[dict[str, Any]], world_size: int, rank: int) -> dict[str, Any]:
    """The DCP head state of `rank` out of `world_size` from the shards a sharded pool saved (rank order)."""
    meta = shards[0]["meta"]
    queue_size, dim = int(meta["queue_size"]), int(meta["embedding_size"])
    if len(shards) != meta["world_size"] or [s["meta"]["rank"] for s in shards] != list(range(len(shards))):
        raise PoolReshardError(f"expected {meta['world_size']} pool shards in rank order")
    if "init_seed" not in shards[0]["pool"]:
        raise PoolReshardError("the pool was saved without its init seed; resume on its saving world size")
    if queue_size < world_size:
        raise PoolReshardError(f"a pool of {queue_size} slots cannot be split over {world_size} ranks")
    labels, ages, features, pointers = _pooled(shards)
    mine = torch.nonzero(label_owner(labels, world_size) == rank).flatten()
    start, count = class_partition(queue_size, world_size, rank)
    # most recent first (smallest age); ties broken by label so every rank derives the same order
    order = sorted(mine.tolist(), key=lambda i: (int(ages[i]), int(labels[i])))[:count]
    kept = torch.tensor(order[::-1], dtype=torch.int64)  # oldest first: stamps 0..k-1 keep the LRU order
    k = kept.numel()
    out_features = init_pool_rows(start, count, dim, int(shards[0]["pool"]["init_seed"]))
    out_features[:, :k] = features[:, kept]
    slot_label = torch.full((count,), -1, dtype=torch.int64)
    slot_label[:k] = labels[kept]
    row_ptr = torch.zeros(count, dtype=torch.int64)
    row_ptr[:k] = pointers[kept]
    empty = torch.arange(count - k, dtype=torch.int64)
    last_seen = torch.cat([torch.arange(k, dtype=torch.int64), empty - (count - k)])
    pool = {"features": out_features, "slot_label": slot_label, "last_seen": last_seen, "row_ptr": row_ptr,
            "clock": k, "first_slot": start, "init_seed": shards[0]["pool"]["init_seed"]}
    new_meta = {**meta, "world_size": world_size, "rank": rank, "slots": count}
    return {"meta": new_meta, "pool": pool, "gallery_net": shards[0]["gallery_net"],
            "iteration": shards[0]["iteration"]}


def is_sharded_pool(shard: dict[str, Any]) -> bool:
    """Whether a saved head state is one shard of a sharded DCP pool."""
    return shard.get("meta", {}).get("pool_mode") == "sharded" and "pool" in shard
