"""`facescale reshard` and `facescale export-head`: offline work on a saved step directory (one process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from facescale.writable import require_writable


def _reshard(args: argparse.Namespace) -> int:
    from facescale.checkpoint import CheckpointError, reshard_checkpoint, resolve_checkpoint

    if args.world_size < 1:
        raise CheckpointError(
            f"--world-size must be >= 1, got {args.world_size}",
            fix="pass the number of ranks the copy is for",
        )
    source = resolve_checkpoint(args.checkpoint)
    require_writable(args.out, "--out")
    out = reshard_checkpoint(source, args.world_size, Path(args.out))
    print(
        f"[reshard] {source} -> {out} for {args.world_size} ranks; resume with --set checkpoint.resume={out}"
    )
    return 0


def _export_head(args: argparse.Namespace) -> int:
    from facescale.checkpoint import resolve_checkpoint
    from facescale.checkpoint.atomic import atomic_torch_save
    from facescale.partial_fc.export import full_centers

    source = resolve_checkpoint(args.checkpoint)
    require_writable(args.out, "--out", is_file=True)  # before all ranks' centers are read
    centers = full_centers(source, fp32=args.fp32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(centers, out)
    print(f"[export-head] {tuple(centers.shape)} class centers of {source} -> {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("reshard", help="rewrite a checkpoint for another number of ranks (offline)")
    r.add_argument("--checkpoint", required=True, help="a step dir, checkpoints dir or run dir")
    r.add_argument("--world-size", type=int, required=True, help="ranks the new copy is for")
    r.add_argument("--out", required=True, help="new step directory to write (must not exist or be empty)")
    r.set_defaults(func=_reshard)
    e = sub.add_parser("export-head", help="write all class centers of a checkpoint as one [C, D] tensor")
    e.add_argument("--checkpoint", required=True, help="a step dir, checkpoints dir or run dir")
    e.add_argument("--out", required=True, help="output .pt file (torch.load gives the tensor)")
    e.add_argument("--fp32", action="store_true", help="write fp32 (bf16 centers: hi + residual)")
    e.set_defaults(func=_export_head)
