"""Partial FC's share of `facescale plan`: this rank's class-center shard (rows from `class_partition`,
storage from the real head classes), the logits of one micro-step and the head's collectives. The logit width
is the sample_rate budget, or the positives a shard expects from the micro-step's labels where more."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from facescale.config.schema import HeadConfig
from facescale.heads import STORAGE_DTYPES
from facescale.heads.center_optimizer import RESIDUAL, CenterOptimizer
from facescale.heads.sampling import num_samples_for
from facescale.modes.base import ModePlan
from facescale.parallel.partition import class_partition
from facescale.plan.zero import ring_all_gather, ring_all_reduce


@dataclass(frozen=True)
class HeadShard:
    """Rows, sampled width and bytes of one rank's centers and their optimizer state."""

    rank: int
    rows: int
    num_sample: int
    centers_bytes: int
    optimizer_bytes: int  # every row-aligned state buffer, the bf16 residual included
    residual_bytes: int = 0  # bf16 centers: the low half that keeps sub-ulp updates (center_optimizer.py)


def head_shard(cfg: HeadConfig, num_classes: int, embedding_size: int, world: int, rank: int) -> HeadShard:
    """The shard `rank` of `world` would hold; the optimizer buffers are built on the meta device."""
    _, rows = class_partition(num_classes, world, rank)
    dtype = STORAGE_DTYPES[cfg.storage_dtype]
    optimizer = CenterOptimizer(
        rows,
        embedding_size,
        kind=cfg.optimizer,
        mode=cfg.update,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        state_dtype=dtype,
        device="meta",
    )
    buffers = optimizer.state_tensors()
    state = sum(t.numel() * t.element_size() for t in buffers.values())
    residual = buffers[RESIDUAL].numel() * buffers[RESIDUAL].element_size() if RESIDUAL in buffers else 0
    element = torch.empty((), dtype=dtype).element_size()
    num_sample = min(rows, num_samples_for(cfg.sample_rate, rows))
    return HeadShard(rank, rows, num_sample, rows * embedding_size * element, state, residual)


def expected_positives(rows: int, num_classes: int, batch: int) -> int:
    """Distinct classes a shard of `rows` of `num_classes` expects among `batch` labels drawn uniformly: each
    of its rows is a positive with probability 1 - (1 - 1/C)^B (rounded up)."""
    miss = math.exp(batch * math.log1p(-1 / num_classes)) if num_classes > 1 else 0.0
    return min(rows, math.ceil(rows * (1 - miss)))


def sampled_columns(num_sample: int, rows: int, num_classes: int, batch: int) -> int:
    """The centers one micro-step keeps on a shard of `rows`: `sample_centers` keeps the num_sample budget,
    or every positive of the `batch` gathered labels on the shard when there are more (as expected)."""
    return max(num_sample, expected_positives(rows, num_classes, batch))


def head_step_bytes(columns: int, global_batch: int, embedding_size: int) -> dict[str, int]:
    """Transient head memory of one micro-step: logits [B_global, columns] and the sampled centers.

    The cosine logits are fp32 and turned into probabilities in place (kept for backward); the sampled
    center rows are copied out of the shard (index_select) and get a gradient of the same size.
    """
    return {
        "logits": global_batch * columns * 4,
        "sampled centers + grad": 2 * columns * embedding_size * 4,
        "gathered embeddings + grad": 2 * global_batch * embedding_size * 4,
    }


def head_traffic(global_batch: int, embedding_size: int, world: int) -> dict[str, float]:
    """Head bytes per rank per micro-step (see facescale/heads/partial_fc.py and dist_cross_entropy.py)."""
    return {
        "embedding all-gather": ring_all_gather(global_batch * embedding_size * 4, world),
        "label all-gather": ring_all_gather(global_batch * 8, world),
        "softmax max + sum all-reduces": ring_all_reduce(global_batch * 4, world)
        + ring_all_reduce(2 * global_batch * 4, world),
        "embedding grad reduce-scatter": ring_all_gather(global_batch * embedding_size * 4, world),
    }


def largest_shard_rank(num_classes: int, world: int) -> int:
    """The rank with the most class centers: class_partition gives the remainder rows to the first ranks."""
    return max(range(min(world, 2)), key=lambda r: class_partition(num_classes, world, r)[1])


@dataclass(frozen=True)
class PartialFCPlan(HeadShard, ModePlan):
    """`HeadShard` plus what one micro-step of `batch` gathered rows adds and sends."""

    batch: int = 0  # rows the head sees per micro-step (micro batch x world)
    embedding_size: int = 0
    world: int = 1
    columns: int = 0  # logit columns per micro-step: sampled_columns (expected, where the positives decide)

    @property
    def memory(self) -> dict[str, int]:
        residual = {"center bf16 residual": self.residual_bytes} if self.residual_bytes else {}
        return {"center shard": self.centers_bytes,
                "center optimizer state": self.optimizer_bytes - self.residual_bytes, **residual}

    @property
    def step_memory(self) -> dict[str, int]:
        return head_step_bytes(self.columns, self.batch, self.embedding_size)

    @property
    def traffic(self) -> dict[str, float]:
        return head_traffic(self.batch, self.embedding_size, self.world)

    @property
    def positives_dominate(self) -> bool:
        """Whether the batch's positives, not sample_rate, set the logit width (`columns`: expected)."""
        return self.columns > self.num_sample

    @property
    def summary(self) -> str:
        head = f"rank {self.rank} holds {self.rows:,} class centers, "
        if not self.positives_dominate:
            return head + f"samples {self.columns:,} per step"
        return head + (f"samples about {self.columns:,} per step (every positive of the {self.batch:,} "
                       f"gathered labels on its shard, as expected from shuffled data, more for batches of "
                       f"few identities; sample_rate alone {self.num_sample:,})")

    @property
    def table_rows(self) -> dict[str, str]:
        columns = f"~{self.columns:,}" if self.positives_dominate else f"{self.columns:,}"
        return {"class centers": f"{self.rows:,}", "logits columns": columns}

    @property
    def activation_images(self) -> int:
        return self.batch // self.world


def plan_partial_fc(
    cfg, num_classes: int, world: int, micro_batch: int, rank: int | None = None
) -> PartialFCPlan:
    """The Partial FC plan of `rank` (default: the one with the largest center shard)."""
    rank = largest_shard_rank(num_classes, world) if rank is None else rank
    shard = head_shard(cfg.head, num_classes, cfg.model.embedding_size, world, rank)
    batch = micro_batch * world
    return PartialFCPlan(**vars(shard), batch=batch, embedding_size=cfg.model.embedding_size, world=world,
                         columns=sampled_columns(shard.num_sample, shard.rows, num_classes, batch))
