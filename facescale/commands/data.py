"""`facescale convert rec|folder` (insightface RecordIO or image folders -> shards), `facescale validate`."""

from __future__ import annotations

import argparse
import sys

from facescale.commands import bounded_int


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from facescale.data.convert import convert, folder_source, rec_source
    from facescale.data.eval_sets import copy_verification_sets
    from facescale.writable import require_writable

    require_writable(args.out, "--out")  # before a listing of millions of files, or the first shard
    if args.format == "rec":
        source = rec_source(args.rec, args.idx or Path(args.rec).with_suffix(".idx"))
    else:
        source = folder_source(args.root, None if args.depth == "auto" else int(args.depth), not args.quiet,
                               out=args.out)
    summary = convert(source, args.out, shard_size=args.shard_size, seed=args.seed, workers=args.workers,
                      image_size=args.image_size, quality=args.quality, overwrite=args.overwrite,
                      progress=not args.quiet)
    lines = summary.lines()
    if args.format == "rec":  # lfw.bin, cfp_fp.bin, agedb_30.bin ship beside insightface's train.rec
        lines += copy_verification_sets(Path(args.rec).parent, args.out)
    for line in lines:
        print(f"[convert] {line}")
    return 0


def _depth(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"'{value}' is not 'auto' or a level count >= 1")
    return value


def _validate(args: argparse.Namespace) -> int:
    from facescale.data.validate import validate_directory

    report = validate_directory(args.dir, workers=args.workers, progress=not args.quiet)
    for line in report.lines(show=args.show):
        print(f"[validate] {line}")
    if args.counts_csv:
        with open(args.counts_csv, "w") as out:
            out.write("label,images\n" + "".join(f"{i},{n}\n" for i, n in enumerate(report.counts.tolist())))
    if not report.ok:
        sys.stderr.write(f"facescale validate: error: {args.dir}: {len(report.problems)} problems (listed "
                         "above); repair or re-convert those shards, or train with data.on_bad_sample=skip\n")
        return 1
    return 0


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for train-*.tar, *.idx, manifest.json")
    parser.add_argument("--shard-size", type=bounded_int(1), default=20000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument("--workers", type=bounded_int(1), default=None,
                        help="worker processes (default: all cores)")
    parser.add_argument("--image-size", type=bounded_int(16), default=112)
    parser.add_argument("--quality", type=bounded_int(1, 100), default=95,
                        help="JPEG quality of re-encoded images (1-100)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of another conversion")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert insightface RecordIO or image folders to shards "
                                             "(resumable: re-run the same command after an interruption)")
    formats = convert.add_subparsers(dest="format", required=True)
    rec = formats.add_parser("rec", help="insightface train.rec + train.idx (no MXNet needed)")
    rec.add_argument("--rec", required=True)
    rec.add_argument("--idx", default=None, help="default: --rec with the suffix .idx")
    _add_output_options(rec)
    folder = formats.add_parser("folder", help="one directory of images per identity under --root, possibly "
                                                "nested (WebFace42M: root/0..9/<identity>/*.jpg)")
    folder.add_argument("--root", required=True)
    folder.add_argument("--depth", type=_depth, default="auto",
                        help="directory levels from --root to an identity (1 = flat, 2 = WebFace42M's "
                             "root/0..9/<identity>); auto (default) follows the first directories to images")
    _add_output_options(folder)
    convert.set_defaults(func=_convert)

    validate = sub.add_parser("validate", help="decode every sample of a shard directory, check the manifest")
    validate.add_argument("dir")
    validate.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.add_argument("--show", type=int, default=50, help="problems to print")
    validate.add_argument("--counts-csv", default="", help="write per-identity image counts here")
    validate.set_defaults(func=_validate)
