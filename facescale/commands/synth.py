"""`facescale synth`: synthetic identities as WebDataset shards plus a held-out verification .bin."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from facescale.data.synth import synthesize

    m = synthesize(
        args.out,
        identities=args.identities,
        images_per_identity=args.images_per_identity,
        holdout_identities=args.holdout_identities,
        seed=args.seed,
        image_size=args.image_size,
        verify_pairs=args.verify_pairs,
        overwrite=args.overwrite,
    )
    print(f"[synth] wrote {m.num_samples} images of {m.num_classes} identities to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synth", help="write synthetic identities as WebDataset shards + a verification .bin")
    s.add_argument("--out", required=True)
    s.add_argument("--identities", type=int, default=1000)
    s.add_argument("--images-per-identity", type=int, default=24)
    s.add_argument("--holdout-identities", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--verify-pairs", type=int, default=3000, help="pairs in verify.bin (half same identity)")
    s.add_argument("--overwrite", action="store_true", help="replace shards and verify.bin already in --out")
    s.set_defaults(func=_run)
