"""arcface_torch-style schedule settings: epochs instead of steps, a per-rank batch instead of the global one.

`schedule.epochs` / `schedule.warmup_epochs` become steps through the manifest's sample count and the global
batch (steps per epoch = samples // global batch, as arcface_torch counts them); `schedule.batch_per_rank`
becomes `global_batch_size = batch_per_rank x world size x grad_accumulation`. Exactly one key of each pair
may be set. Resolution runs once at start-up, when the world size is known, and is printed.
"""

from __future__ import annotations

from facescale.config.errors import ConfigError
from facescale.config.schema import Config

PAIRS = (("steps", "epochs"), ("warmup_steps", "warmup_epochs"), ("global_batch_size", "batch_per_rank"))


def check_schedule_pairs(raw: dict, source: str) -> None:
    """Refuse a YAML/--set mapping that sets both keys of a pair (e.g. schedule.steps and schedule.epochs)."""
    schedule = raw.get("schedule") if isinstance(raw, dict) else None
    if not isinstance(schedule, dict):
        return
    for count, alternative in PAIRS:
        if count in schedule and schedule.get(alternative):  # 0 is "unset" (a saved, resolved config)
            raise ConfigError(
                f"schedule.{count} and schedule.{alternative} are both set", where=source,
                fix=f"set exactly one of them (schedule.{alternative} is resolved into schedule.{count} at "
                    "start-up)")


def needs_resolution(cfg: Config) -> bool:
    sch = cfg.schedule
    return bool(sch.epochs or sch.warmup_epochs or sch.batch_per_rank)


def resolve_schedule(cfg: Config, world_size: int, num_samples: int | None = None) -> str:
    """Turn epochs / batch_per_rank into steps / global_batch_size in place; return the start-up line.

    `num_samples` defaults to the manifest's count under `data.shards` (read only when epochs are set).
    """
    sch = cfg.schedule
    if sch.epochs < 0 or sch.warmup_epochs < 0 or sch.batch_per_rank < 0:
        raise ConfigError("schedule.epochs, warmup_epochs and batch_per_rank must be >= 0 (0 = unset)")
    parts = []
    if sch.batch_per_rank:
        sch.global_batch_size = sch.batch_per_rank * world_size * sch.grad_accumulation
        parts.append(f"global batch {sch.global_batch_size} = {sch.batch_per_rank} per rank x {world_size} "
                     f"ranks x {sch.grad_accumulation} accumulation")
        sch.batch_per_rank = 0
    if sch.epochs or sch.warmup_epochs:
        if num_samples is None:
            from facescale.data.manifest import Manifest

            num_samples = Manifest.load(cfg.data.shards).num_samples
        per_epoch = num_samples // sch.global_batch_size
        if per_epoch < 1:
            raise ConfigError(f"schedule.epochs: {num_samples} samples make no full step of the global batch "
                              f"{sch.global_batch_size}", fix="lower the batch or use schedule.steps")
        if sch.epochs:
            sch.steps = max(1, int(per_epoch * sch.epochs))
            parts.append(f"{sch.epochs:g} epochs x {per_epoch} steps ({num_samples} samples // "
                         f"{sch.global_batch_size}) = {sch.steps} steps")
        if sch.warmup_epochs:
            sch.warmup_steps = int(per_epoch * sch.warmup_epochs)
            parts.append(f"warm-up {sch.warmup_epochs:g} epochs = {sch.warmup_steps} steps")
        sch.epochs = sch.warmup_epochs = 0.0
    return "[facescale] schedule: " + "; ".join(parts) if parts else ""
