"""F2C's share of `facescale plan`: the pool (Q slots x 2 feature rows, or this rank's Q/W of a sharded one),
the G-Net copy, the identity index and the collectives of one pool iteration (two passes).

Per rank and pass, n = B_id + B/2 probes and as many gallery rows (see `dual_loader`). A replicated pool's
traffic does not depend on the data; a sharded pool's softmax and top-K collectives do (pooled vs unpooled
probes), so its figure is the bound where every probe takes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facescale.parallel.partition import class_partition
from facescale.plan.zero import ring_all_gather, ring_all_reduce

F32, I64 = 4, 8
POOL_INDEX_ARRAYS = 5  # slot_label, last_seen, row_ptr, and the sorted (labels, slots) lookup map
INDEX_BYTES_PER_IMAGE = 16  # shard (int32), offset (int64), size (int32)


@dataclass(frozen=True)
class F2CPlan:
    """One rank of an F2C run (implements `facescale.modes.base.ModePlan`)."""

    rank: int
    world: int
    slots: int  # pool slots this rank holds (Q replicated, its class_partition share sharded)
    queue_size: int
    sharded: bool
    embedding_size: int
    probes: int  # n = identities_per_rank + micro_batch / 2, per pass and rank
    top_k: int
    gnet_bytes: int
    num_classes: int
    num_samples: int | None

    @property
    def memory(self) -> dict[str, int]:
        return {
            "G-Net (fp32 EMA copy)": self.gnet_bytes,
            "pool features (slots x 2 x D)": self.slots * 2 * self.embedding_size * F32,
            "pool labels, recency, index": self.slots * POOL_INDEX_ARRAYS * I64,
        }

    @property
    def step_memory(self) -> dict[str, int]:
        n, w, d = self.probes, self.world, self.embedding_size
        rows = w * n if self.sharded else n  # probes scored against this rank's slots
        return {
            "G-Net features (x, y)": 2 * n * d * F32,
            "gathered gallery + labels": w * n * (d * F32 + I64),
            "probe features + grad": 2 * 2 * rows * d * F32,
            "logits (2 views)": 2 * rows * self.slots * F32,
        }

    @property
    def host_memory(self) -> dict[str, int]:
        index = (self.num_classes + 1) * I64 + INDEX_BYTES_PER_IMAGE * (self.num_samples or 0)
        return {"identity index": index}

    @property
    def traffic(self) -> dict[str, float]:
        """Bytes sent per rank in one micro-step (two passes), ring algorithms."""
        n, w, d = self.probes, self.world, self.embedding_size
        passes = 2
        out = {
            "gallery feature all-gather": passes * ring_all_gather(w * n * d * F32, w),
            "gallery label all-gather": passes * ring_all_gather(w * n * I64, w),
            "pool capacity check": passes * ring_all_gather(w * 2 * I64, w),
        }
        if not self.sharded:
            out["loss counts + sums"] = passes * (ring_all_gather(w * 2 * I64, w) + ring_all_reduce(2 * 8, w))
            return out
        views = 2
        out["probe gather + grad scatter"] = passes * 2 * ring_all_gather(w * n * d * F32, w)
        out["probe labels + pooled flags"] = passes * (
            ring_all_gather(w * n * I64, w) + ring_all_reduce(w * n * 4, w))
        out["softmax + top-K (bound)"] = passes * views * (
            ring_all_reduce(w * n * F32, w) + ring_all_reduce(2 * w * n * F32, w)
            + ring_all_gather(w * self.top_k * w * n * F32, w))
        out["pool fill"] = ring_all_gather(w * I64, w)
        return out

    @property
    def summary(self) -> str:
        kind = f"its {self.slots:,} of {self.queue_size:,} sharded" if self.sharded else f"all {self.slots:,}"
        index = f"{self.num_samples:,} images" if self.num_samples else "images unknown"
        return (f"rank {self.rank} holds {kind} pool slots (2 x {self.embedding_size} fp32 each), a G-Net "
                f"copy and the identity index of {self.num_classes:,} identities ({index}); "
                f"{self.probes} probes per pass")

    @property
    def table_rows(self) -> dict[str, str]:
        return {"pool slots": f"{self.slots:,}", "probes per pass": f"{self.probes:,}"}

    @property
    def activation_images(self) -> int:
        return 2 * self.probes  # P-Net forwards x and y, both kept for the one backward


def plan_f2c(cfg: Any, data: Any, world: int, micro_batch: int, backbone: Any,
             rank: int | None = None) -> F2CPlan:
    """The F2C plan of `rank` (default 0: a sharded pool gives the remainder slots to the first ranks)."""
    from facescale.f2c.loss import outlier_top_k

    f2c = cfg.head.f2c
    rank = 0 if rank is None else rank
    sharded = f2c.pool == "sharded"
    slots = class_partition(f2c.queue_size, world, rank)[1] if sharded else f2c.queue_size
    return F2CPlan(
        rank=rank,
        world=world,
        slots=slots,
        queue_size=f2c.queue_size,
        sharded=sharded,
        embedding_size=cfg.model.embedding_size,
        probes=(f2c.identities_per_rank or micro_batch) + micro_batch // 2,
        top_k=outlier_top_k(f2c.queue_size),
        gnet_bytes=4 * backbone.num_params + backbone.buffer_bytes,
        num_classes=data.num_classes,
        num_samples=data.num_samples,
    )
