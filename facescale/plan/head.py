"""This rank's class-center shard: rows from `class_partition`, storage from the real head classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facescale.config.schema import HeadConfig
from facescale.heads import STORAGE_DTYPES
from facescale.heads.center_optimizer import RESIDUAL, CenterOptimizer
from facescale.heads.sampling import num_samples_for
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


def head_step_bytes(shard: HeadShard, global_batch: int, embedding_size: int) -> dict[str, int]:
    """Transient head memory of one micro-step: logits [B_global, num_sample] and the sampled centers.

    The cosine logits are fp32 and turned into probabilities in place (kept for backward); the sampled
    center rows are copied out of the shard (index_select) and get a gradient of the same size.
    """
    return {
        "logits": global_batch * shard.num_sample * 4,
        "sampled centers + grad": 2 * shard.num_sample * embedding_size * 4,
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
