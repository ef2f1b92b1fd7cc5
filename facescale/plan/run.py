"""Put the pieces together for one rank of a run: what it stores, what it moves per step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from facescale.config.errors import ConfigError
from facescale.config.schema import Config
from facescale.data.known_sets import KNOWN_SETS
from facescale.modes.base import ModePlan
from facescale.modes.registry import get_mode
from facescale.plan.backbone import BackboneStats, backbone_stats
from facescale.plan.zero import ZeroMemory, zero_memory, zero_traffic


@dataclass(frozen=True)
class DataSize:
    """Identities and images of the training set (images None when unknown)."""

    num_classes: int
    num_samples: int | None = None


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
    head: ModePlan  # the training mode's share (Partial FC: the center shard; F2C: pool, G-Net, index)
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
            **self.head.memory,
            **self.head.step_memory,
            "backbone activations": self.activations,
        }

    @property
    def host_memory(self) -> dict[str, int]:
        """Named bytes in host RAM (not counted in `total_memory`)."""
        return self.head.host_memory

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
    if name in KNOWN_SETS:
        return KNOWN_SETS[name][0]
    raise ConfigError(
        f"data.shards: '{cfg.data.shards}' has no manifest.json and is not a known data set "
        f"({', '.join(sorted(KNOWN_SETS))}); pass --num-classes N"
    )


def resolve_num_samples(cfg: Config) -> int | None:
    """Images of the training set: the shards' manifest.json, else a known data set, else None."""
    manifest = Path(cfg.data.shards) / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text()).get("num_samples", 0)) or None
    known = KNOWN_SETS.get(Path(cfg.data.shards).name.lower())
    return known[1] if known else None


def plan_rank(
    cfg: Config,
    num_classes: int,
    world: int,
    rank: int | None = None,
    stats: BackboneStats | None = None,
    num_samples: int | None = None,
) -> RankPlan:
    """The plan of `rank` (default: the one the training mode says holds the most) at `world` ranks."""
    sch = cfg.schedule
    if sch.global_batch_size % (world * sch.grad_accumulation):
        raise ConfigError(
            f"schedule.global_batch_size: {sch.global_batch_size} is not divisible by {world} ranks x "
            f"grad_accumulation {sch.grad_accumulation}"
        )
    precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision
    micro = sch.global_batch_size // (world * sch.grad_accumulation)
    stats = stats or backbone_stats(cfg.model, precision, cfg.data.image_size)
    data = DataSize(num_classes, num_samples if num_samples is not None else resolve_num_samples(cfg))
    head = get_mode(cfg.head.type).plan(cfg, data, world, micro, stats, rank)
    zero = zero_memory(
        stats.num_params,
        cfg.deepspeed.zero_stage,
        world,
        precision,
        cfg.optim.name,
        cfg.optim.momentum,
        stats.trainable,
    )
    traffic = {name: value * sch.grad_accumulation for name, value in head.traffic.items()}
    traffic.update(zero_traffic(stats.trainable, cfg.deepspeed.zero_stage, world, precision))
    return RankPlan(
        world=world,
        micro_batch=micro,
        global_batch=sch.global_batch_size,
        precision=precision,
        zero_stage=cfg.deepspeed.zero_stage,
        backbone=stats,
        zero=zero,
        head=head,
        activations=stats.activation_bytes_per_sample * head.activation_images,
        traffic=traffic,
    )
