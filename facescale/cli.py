"""The `facescale` command: train, synth, eval, export."""

from __future__ import annotations

import argparse
import sys

from facescale.config.load import ConfigError


def _train(args: argparse.Namespace) -> int:
    from facescale.train.run import run_training

    run_training(args.config, args.set or [])
    return 0


def _synth(args: argparse.Namespace) -> int:
    from facescale.data.synth import synthesize

    m = synthesize(args.out, identities=args.identities, images_per_identity=args.images_per_identity,
                   holdout_identities=args.holdout_identities, seed=args.seed, image_size=args.image_size)
    print(f"[synth] wrote {m.num_samples} images of {m.num_classes} identities to {args.out}")
    return 0


def _eval_verify(args: argparse.Namespace) -> int:
    import json

    import torch

    from facescale.checkpoint import load_backbone
    from facescale.eval.extract import evaluate_bin

    model, _ = load_backbone(args.checkpoint)
    for path in args.bin:
        res = evaluate_bin(model, path, batch_size=args.batch_size, device=torch.device("cpu"), rank=0,
                           world_size=1)
        print(json.dumps({"bin": path, **res}, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facescale", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (one rank per process under torchrun/deepspeed/srun)")
    t.add_argument("--config", required=True, help="YAML file, e.g. configs/synthetic.yaml")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    t.set_defaults(func=_train)

    s = sub.add_parser("synth", help="write synthetic identities as WebDataset shards + a verification .bin")
    s.add_argument("--out", required=True)
    s.add_argument("--identities", type=int, default=1000)
    s.add_argument("--images-per-identity", type=int, default=24)
    s.add_argument("--holdout-identities", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=112)
    s.set_defaults(func=_synth)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="eval_command", required=True)
    v = esub.add_parser("verify", help="10-fold verification on insightface .bin sets")
    v.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    v.add_argument("--bin", nargs="+", required=True)
    v.add_argument("--batch-size", type=int, default=64)
    v.set_defaults(func=_eval_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        sys.stderr.write(f"facescale: config error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
