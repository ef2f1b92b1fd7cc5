"""Per-rank backbone memory and per-step traffic under DeepSpeed ZeRO stages 0-3, as facescale runs it.

Storage model (checked against a real engine at W=2 in tests/test_plan.py): bf16 runs as torch autocast, so
parameters and gradients stay fp32; ZeRO stages 1-3 keep an fp32 copy of this rank's parameter partition for
the optimizer; stage 1 shards optimizer state, 2 also gradients, 3 also parameters. fp16 keeps fp16
parameters and gradients plus the fp32 partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OPTIMIZER_STATE_BYTES = {"sgd": 4, "adamw": 8}  # fp32 momentum | exp_avg + exp_avg_sq, per parameter


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes one rank holds for the backbone."""

    params: int
    grads: int
    master: int  # fp32 copy of the rank's partition (ZeRO >= 1)
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def _optimizer_bytes_per_param(optimizer: str, momentum: float) -> int:
    if optimizer == "sgd":
        return 4 if momentum > 0 else 0
    return OPTIMIZER_STATE_BYTES[optimizer]


def zero_memory(
    num_params: int,
    stage: int,
    world: int,
    precision: str,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    trainable: int | None = None,
) -> ZeroMemory:
    """Backbone bytes per rank under ZeRO `stage` on `world` ranks; gradients and optimizer state cover the
    `trainable` parameters only (default: all; insightface-style backbones freeze one BatchNorm scale)."""
    weight_bytes = 2 if precision == "fp16" else 4
    trainable = num_params if trainable is None else trainable
    part = math.ceil(trainable / world)
    return ZeroMemory(
        params=weight_bytes * (math.ceil(num_params / world) if stage >= 3 else num_params),
        grads=weight_bytes * (part if stage >= 2 else trainable),
        master=4 * part if stage >= 1 else (4 * trainable if precision == "fp16" else 0),
        optimizer=_optimizer_bytes_per_param(optimizer, momentum) * (part if stage >= 1 else trainable),
    )


def ring_all_reduce(nbytes: float, world: int) -> float:
    """Bytes each rank sends (= receives) in a ring all-reduce of `nbytes`."""
    return 2 * (world - 1) / world * nbytes if world > 1 else 0.0


def ring_all_gather(total_bytes: float, world: int) -> float:
    """Bytes each rank receives in an all-gather whose result is `total_bytes` (reduce-scatter: the same)."""
    return (world - 1) / world * total_bytes if world > 1 else 0.0


def zero_traffic(num_params: int, stage: int, world: int, precision: str) -> dict[str, float]:
    """Backbone bytes per rank per optimizer step: gradient reduction and parameter (all-)gathers."""
    weight_bytes = 2 if precision == "fp16" else 4
    size = num_params * weight_bytes
    if stage == 0:
        return {"backbone grad all-reduce": ring_all_reduce(size, world)}
    traffic = {
        "backbone grad reduce-scatter": ring_all_gather(size, world),
        "backbone param all-gather": ring_all_gather(size, world),
    }
    if stage == 3:  # parameters are gathered for forward and again for backward
        traffic["backbone param all-gather"] *= 2
    return traffic
