"""`facescale train`: one training process (one rank per process under torchrun/deepspeed/srun)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from launcher.preemption import PreemptionFlag

    preemption = PreemptionFlag.install()  # before the heavy imports: a start-up signal waits for step 1
    from facescale.train.run import run_training

    run_training(args.config, args.set or [], preemption)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train (one rank per process under torchrun/deepspeed/srun)")
    t.add_argument("--config", required=True, help="YAML file, e.g. configs/synthetic.yaml")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    t.set_defaults(func=_run)
