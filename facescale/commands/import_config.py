"""`facescale import-config`: print or write the facescale YAML for an arcface_torch Python config."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from facescale.config.arcface_import import ImportConfigError, import_config_yaml

    if args.gpus is not None and args.gpus < 1:
        raise ImportConfigError(f"--gpus must be >= 1, got {args.gpus}",
                                fix="give the GPU count of the run, or leave it out for a per-GPU batch")
    text = import_config_yaml(args.config, args.gpus)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"[import-config] wrote {args.out}; check it with `facescale train --config {args.out}` "
              f"once data.shards holds the converted data")
    else:
        print(text, end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-config", help="facescale YAML for an arcface_torch configs/*.py (never run)")
    p.add_argument("config", help="arcface_torch config, e.g. configs/wf42m_pfc02_r100.py")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPU count: writes the global batch (batch_size x GPUs) instead of the per-GPU batch")
    p.add_argument("--out", help="write the YAML here instead of printing it")
    p.set_defaults(func=_run)
