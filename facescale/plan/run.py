"""Put the pieces together for one rank of a run: what it stores, what it moves per step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from facescale.config.errors import ConfigError
from facescale.config.schema import Config
from facescale.parallel.partition import class_partition
from facescale.plan.backbone import BackboneStats, backbone_stats
from facescale.plan.head import HeadShard, head_shard, head_step_bytes, head_traffic
from facescale.plan.zero import ZeroMemory, zero_memory, zero_traffic

# identities of public training sets, used when the shards are not on this machine (keyed by folder name)
KNOWN_NUM_CLASSES = {
    "webface42m": 2_059_906,
    "webface12m": 617_970,
    "webface4m": 205_990,
    "glint360k": 360_232,
    "ms1mv3": 93_431,
}


@dataclass
class RankPlan:
    """Memory (bytes) of one rank and its communication (bytes sent per rank) for one optimizer step."""

    world: int
    micro_batch: int
    global_batch: int
    precision: str
    zero_stage: int
    backbone: BackboneStats
    zero: ZeroMemory
    head: HeadShard
    head_step: dict[str, int]
    activations: int
    traffic: dict[str, float] = field(default_factory=dict)

    @property
    def memory(self) -> dict[str, int]:
        """Named memory items of this rank, in report order."""
        return {
            "backbone params": self.zero.params,
            "backbone grads": self.zero.grads,
            "backbone fp32 partition": self.zero.master,
            "backbone optimizer state": self.zero.optimizer,
            "center shard": self.head.centers_bytes,
            "center optimizer state": self.head.optimizer_bytes - self.head.residual_bytes,
            **({"center bf16 residual": self.head.residual_bytes} if self.head.residual_bytes else {}),
            **self.head_step,
            "backbone activations": self.activations,
        }

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())

    @property
    def total_traffic(self) -> float:
        return sum(self.traffic.values())


def resolve_num_classes(cfg: Config, num_classes: int | None = None) -> int:
    """--num-classes, else the shards' manifest.json, else a known data set named by the shard folder."""
    if num_classes:
        return num_classes
    manifest = Path(cfg.data.shards) / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["num_classes"])
    name = Path(cfg.data.shards).name.lower()
    if name in KNOWN_NUM_CLASSES:
        return KNOWN_NUM_CLASSES[name]
    raise ConfigError(
        f"data.shards: '{cfg.data.shards}' has no manifest.json and is not a known data set "
        f"({', '.join(sorted(KNOWN_NUM_CLASSES))}); pass --num-classes N"
    )


def largest_shard_rank(num_classes: int, world: int) -> int:
    """The rank with the most class centers: class_partition gives the remainder rows to the first ranks."""
    return max(range(min(world, 2)), key=lambda r: class_partition(num_classes, world, r)[1])


def plan_rank(
    cfg: Config, num_classes: int, world: int, rank: int | None = None, stats: BackboneStats | None = None
) -> RankPlan:
    """The plan of `rank` (default: the one with the largest center shard) in a world of `world` ranks."""
    sch = cfg.schedule
    if sch.global_batch_size % (world * sch.grad_accumulation):
        raise ConfigError(
            f"schedule.global_batch_size: {sch.global_batch_size} is not divisible by {world} ranks x "
            f"grad_accumulation {sch.grad_accumulation}"
        )
    precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision
    micro = sch.global_batch_size // (world * sch.grad_accumulation)
    batch_per_micro_step = micro * world  # rows the head sees in one forward
    stats = stats or backbone_stats(cfg.model, precision, cfg.data.image_size)
    rank = largest_shard_rank(num_classes, world) if rank is None else rank
    shard = head_shard(cfg.head, num_classes, cfg.model.embedding_size, world, rank)
    optimizer = cfg.optim.name
    zero = zero_memory(
        stats.num_params,
        cfg.deepspeed.zero_stage,
        world,
        precision,
        optimizer,
        cfg.optim.momentum,
        stats.trainable,
    )
    traffic: dict[str, float] = {}
    for name, value in head_traffic(batch_per_micro_step, cfg.model.embedding_size, world).items():
        traffic[name] = value * sch.grad_accumulation
    traffic.update(zero_traffic(stats.trainable, cfg.deepspeed.zero_stage, world, precision))
    return RankPlan(
        world=world,
        micro_batch=micro,
        global_batch=sch.global_batch_size,
        precision=precision,
        zero_stage=cfg.deepspeed.zero_stage,
        backbone=stats,
        zero=zero,
        head=shard,
        head_step=head_step_bytes(shard, batch_per_micro_step, cfg.model.embedding_size),
        activations=stats.activation_bytes_per_sample * micro,
        traffic=traffic,
    )
