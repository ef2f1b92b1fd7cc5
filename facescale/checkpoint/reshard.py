"""Re-cut saved class-center shards for another world size, with `class_partition` as the only rule.

A head shard (`head.state_dict()`) is {"meta": {num_classes, start, count, ...}, ...}. Every tensor anywhere
in it whose first dimension is the shard's `count` is per-row (centers, momentum, Adam moments, per-row step
counts) and is re-cut by global class row; everything else (scalars, replicated state) must be identical on
all shards and is copied. A head without `count` in its meta (F2C's replicated pool: `world_size` 1 in its
meta) is replicated: every new rank gets shard 0's state unchanged. A state format only one training mode
knows (F2C's sharded pool, re-homed by label owner) is re-cut by that mode (`reshard_head_state`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from facescale.checkpoint.atomic import atomic_torch_save, atomic_write_text
from facescale.checkpoint.layout import (
    BACKBONE_OPTIMIZER,
    BACKBONE_WEIGHTS,
    COMPLETE,
    CONFIG,
    HEAD_DIR,
    STATE_DIR,
    TRAINER_STATE,
    CheckpointError,
    head_shard_name,
    rank_state_name,
    trained_world_size,
    verify_step_dir,
)
from facescale.checkpoint.safe_load import LEGACY_RANK_STATE_GLOBALS, plain_state, safe_load
from facescale.modes.registry import UnknownModeError, all_modes, get_mode
from facescale.parallel.partition import class_partition


def load_head_shards(step_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """Every saved head shard of a `world_size`-rank checkpoint, in rank order."""
    shards = []
    for rank in range(world_size):
        path = step_dir / HEAD_DIR / head_shard_name(rank, world_size)
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{step_dir}' lacks {HEAD_DIR}/{path.name}")
        shards.append(safe_load(path))
    return shards


def is_row_sharded(shards: list[dict[str, Any]]) -> bool:
    meta = shards[0].get("meta", {})
    return all(k in meta for k in ("num_classes", "start", "count"))


def _check_cover(shards: list[dict[str, Any]]) -> int:
    """The shards must tile [0, num_classes) in order without gaps; returns num_classes."""
    total = shards[0]["meta"]["num_classes"]
    expected_start = 0
    for i, shard in enumerate(sorted(shards, key=lambda s: s["meta"]["start"])):
        meta = shard["meta"]
        if meta["num_classes"] != total or meta["start"] != expected_start:
            raise CheckpointError(
                f"head shard {i} covers [{meta['start']}, +{meta['count']}) of "
                f"{meta['num_classes']} classes; the shards do not tile [0, {total})"
            )
        expected_start += meta["count"]
    if expected_start != total:
        raise CheckpointError(f"head shards cover {expected_start} of {total} classes; a shard is missing")
    return total


def _rows(values: list[Any], counts: list[int], starts: list[int], lo: int, hi: int, where: str) -> Any:
    """Rows [lo, hi) of the per-shard `values` (tensors / nested dicts), or the common replicated value."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _rows([v[k] for v in values], counts, starts, lo, hi, f"{where}.{k}") for k in first}
    if (
        torch.is_tensor(first)
        and first.dim() >= 1
        and all(v.shape[0] == c for v, c in zip(values, counts, strict=True))
    ):
        pieces = []
        for value, start, count in zip(values, starts, counts, strict=True):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                pieces.append(value[a - start : b - start])
        return torch.cat(pieces) if pieces else first[:0].clone()
    for other in values[1:]:
        same = torch.equal(other, first) if torch.is_tensor(first) else other == first
        if not same:
            raise CheckpointError(
                f"head state '{where}' is neither per-row nor identical on every shard; "
                "this head type cannot be resharded"
            )
    return first.clone() if torch.is_tensor(first) else first


def reshard_head(
    shards: list[dict[str, Any]], world_size: int, rank: int, head_type: str | None = None
) -> dict[str, Any]:
    """The head state `rank` of `world_size` needs, cut from `shards` saved at any world size by the training
    mode `head_type` (trainer.json's; None, from files that do not say: every registered mode is asked)."""
    try:
        modes = all_modes() if head_type is None else [get_mode(head_type)]
    except UnknownModeError as exc:
        raise CheckpointError(f"the checkpoint's head was saved by training mode '{head_type}', which is not "
                              f"known here ({exc})") from None
    for mode in modes:  # a mode with its own state format (F2C's sharded pool) re-cuts it itself
        try:
            state = mode.reshard_head_state(shards, world_size, rank)
        except ValueError as exc:
            raise CheckpointError(f"{mode.name} head state: {exc}") from exc
        if state is not None:
            return state
    if not is_row_sharded(shards):
        meta = shards[0].get("meta", {})
        if meta.get("world_size", 1) != 1:
            raise CheckpointError(
                f"head state with meta {meta} is sharded but has no class range "
                "(num_classes/start/count); it cannot be resharded"
            )
        no_rows = [-1] * len(shards)  # no tensor is per-row: every value must be the same on every shard
        return _rows(shards, no_rows, [0] * len(shards), 0, 0, "head")
    num_classes = _check_cover(shards)
    start, count = class_partition(num_classes, world_size, rank)
    counts = [s["meta"]["count"] for s in shards]
    starts = [s["meta"]["start"] for s in shards]
    body = {k: [s[k] for s in shards] for k in shards[0] if k != "meta"}
    out = {k: _rows(v, counts, starts, start, start + count, k) for k, v in body.items()}
    out["meta"] = {**shards[0]["meta"], "start": start, "count": count}
    return out


def reshard_checkpoint(step_dir: Path, world_size: int, out_dir: Path) -> Path:
    """Write a complete copy of `step_dir` for `world_size` ranks to `out_dir` (offline, one process).

    Head shards are re-cut; the backbone is carried by its consolidated weights and optimizer state (the
    DeepSpeed partition files are left out: they only load at the saving world size); rank states are
    copied for ranks that existed, new ranks start fresh generators seeded from (seed, rank, step)."""
    state = verify_step_dir(step_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"output directory '{out_dir}' exists and is not empty; choose a new one")
    shards = load_head_shards(step_dir, state["world_size"])
    head_type = state.get("head_type")
    for sub in (HEAD_DIR, STATE_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for name in (BACKBONE_WEIGHTS, BACKBONE_OPTIMIZER):
        safe_load(step_dir / name)  # copied as they are, so check first that they load without code
    for name in (BACKBONE_WEIGHTS, BACKBONE_OPTIMIZER, CONFIG):
        shutil.copy2(step_dir / name, out_dir / name)
    for rank in range(world_size):
        shard = reshard_head(shards, world_size, rank, head_type)
        atomic_torch_save(shard, out_dir / HEAD_DIR / head_shard_name(rank, world_size))
        source = step_dir / STATE_DIR / rank_state_name(rank)
        rank_state = safe_load(source, LEGACY_RANK_STATE_GLOBALS) if source.is_file() else {"fresh": True}
        atomic_torch_save(plain_state(rank_state), out_dir / STATE_DIR / rank_state_name(rank))
    new_state = {
        **state,
        "world_size": world_size,
        "has_deepspeed_files": False,
        # world_size: the ranks that trained it, kept through a reshard of a resharded copy
        "resharded_from": {"path": str(step_dir), "world_size": trained_world_size(state)},
    }
    atomic_write_text(out_dir / TRAINER_STATE, json.dumps(new_state, indent=2))
    atomic_write_text(out_dir / COMPLETE, f"{state['step']}\n")
    return out_dir
