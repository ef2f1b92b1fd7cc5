"""`facescale train`: one training process (one rank per process under torchrun/deepspeed/srun)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    import sys

    from facescale.checkpoint.disk_space import CheckpointSaveError
    from facescale.train.run import run_training
    from facescale.train.run_lock import RunDirLockedError
    from launcher.env import resolve_dist_env

    try:
        run_training(args.config, args.set or [])
    except (CheckpointSaveError, RunDirLockedError) as exc:  # the run directory, not the code, is at fault
        if resolve_dist_env().rank == 0:  # every rank raises it; one prints it
            sys.stderr.write(f"facescale train: error: {exc}\n")
        return exc.exit_code
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train (one rank per process under torchrun/deepspeed/srun)")
    t.add_argument("--config", required=True, help="YAML file, e.g. configs/synthetic.yaml")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    t.set_defaults(func=_run)
