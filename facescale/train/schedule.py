"""Learning-rate schedule: linear warmup, then polynomial decay to zero at the last step."""

from __future__ import annotations

from facescale.config.schema import ScheduleConfig


def lr_at(step: int, base_lr: float, sch: ScheduleConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if sch.warmup_steps and step < sch.warmup_steps:
        return base_lr * (step + 1) / sch.warmup_steps
    span = max(1, sch.steps - sch.warmup_steps)
    progress = min(1.0, (step - sch.warmup_steps) / span)
    return base_lr * (1.0 - progress) ** sch.power
