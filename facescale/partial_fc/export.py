"""Partial FC's export of a checkpoint: the whole class-center matrix, gathered from the saved shards."""

from __future__ import annotations

from pathlib import Path

import torch

from facescale.checkpoint.layout import CheckpointError, verify_step_dir
from facescale.checkpoint.reshard import is_row_sharded, load_head_shards, reshard_head
from facescale.heads.center_optimizer import RESIDUAL


def full_centers(step_dir: Path, fp32: bool = False) -> torch.Tensor:
    """The whole [num_classes, D] center matrix of a complete checkpoint; `fp32`: as fp32, with the bf16
    residual added back when the centers were stored in bf16 (the value the optimizer tracks)."""
    state = verify_step_dir(step_dir)
    shards = load_head_shards(step_dir, state["world_size"])
    if not is_row_sharded(shards) or "centers" not in shards[0]:
        raise CheckpointError(
            f"'{step_dir}' holds no class-center shards (head meta {shards[0].get('meta')})"
        )
    head = reshard_head(shards, 1, 0, "partial_fc")
    if not fp32:
        return head["centers"]
    residual = head.get("optimizer", {}).get(RESIDUAL)
    centers = head["centers"].to(torch.float32)
    return centers if residual is None else centers + residual.to(torch.float32)
