"""Start-up check that the run directory can hold `checkpoint.keep_last + 1` checkpoints.

The size of one checkpoint comes from the `plan` module (parameter counts from the real layer definitions,
center rows from the class partition), so the warning appears before hours of training, not at the first
save. The head's share is the training mode's own plan at world 1 (all center rows and their optimizer
state for Partial FC; the pool and G-Net copy for F2C).
"""

from __future__ import annotations

from pathlib import Path

from facescale.checkpoint.disk_space import startup_space_warning
from facescale.checkpoint.layout import COMPLETE, parse_step_dir
from facescale.config.schema import Config


def checkpoint_bytes(cfg: Config, num_classes: int, world: int) -> int:
    """Approximate bytes of one step directory of this run at `world` ranks (all files, all ranks)."""
    from facescale.modes.registry import get_mode
    from facescale.plan import DataSize, backbone_stats
    from facescale.plan.zero import zero_memory

    precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision
    stats = backbone_stats(cfg.model, precision, cfg.data.image_size)
    # zero_memory at world 1 gives whole-model sizes: module weights, fp32 master, optimizer moments
    whole = zero_memory(stats.num_params, max(cfg.deepspeed.zero_stage, 1), 1, precision, cfg.optim.name,
                        cfg.optim.momentum, stats.trainable)
    consolidated = 4 * stats.num_params + whole.optimizer  # backbone.pt + backbone_optim.pt
    deepspeed_files = whole.params + whole.master + whole.optimizer
    micro = max(1, cfg.schedule.global_batch_size // cfg.schedule.grad_accumulation)
    # the training mode's state at world 1: every row of every shard (Partial FC), pool + G-Net (F2C)
    head = get_mode(cfg.head.type).plan(cfg, DataSize(num_classes), 1, micro, stats)
    return consolidated + deepspeed_files + sum(head.memory.values())


def warn_if_short_of_space(cfg: Config, run_dir: Path, num_classes: int, world: int, metrics) -> None:
    """Print a warning (rank 0) when free space cannot hold keep_last + 1 checkpoints of this run."""
    root = run_dir / "checkpoints"
    entries = list(root.iterdir()) if root.is_dir() else []
    existing = sum(1 for p in entries if parse_step_dir(p.name) and (p / COMPLETE).is_file())
    keep = cfg.checkpoint.keep_last
    size = checkpoint_bytes(cfg, num_classes, world)
    warning = startup_space_warning(run_dir, size, keep, min(existing, keep))
    if warning:
        metrics.console(warning)
