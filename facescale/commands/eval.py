"""`facescale eval verify|ijb`, `make-bin`, `export onnx|torch`: judge and ship a model."""

from __future__ import annotations

import argparse
import json

from facescale.commands.model_source import add_model_source_args, model_on_ranks
from facescale.writable import require_writable


def _verify(args: argparse.Namespace) -> int:
    """Extraction is split across ranks when launched with several (torchrun/srun); rank 0 reports."""
    from pathlib import Path

    from PIL import Image

    from facescale.eval.extract import evaluate_bin, load_bin_checked

    require_writable(args.out, "--out")  # before the model loads and the sets are embedded
    for path in args.bin:  # a bad set is named before the model is loaded and the extraction starts
        load_bin_checked(path)
    with model_on_ranks(args, "eval verify") as (env, runtime, model, image_size):
        for path in args.bin:
            res = evaluate_bin(model, path, batch_size=args.batch_size, device=runtime.device, rank=env.rank,
                               world_size=env.world_size, image_size=image_size,
                               progress=env.rank == 0, roc_image=env.rank == 0)
            if env.rank != 0:
                continue
            roc = res.pop("roc_image", None)
            if roc is not None:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                res["roc_image"] = str(out / f"{res['name']}_roc.png")
                Image.fromarray(roc).save(res["roc_image"])
            print(json.dumps({"bin": path, **res}, default=str))
    return 0


def _ijb(args: argparse.Namespace) -> int:
    """IJB-B/C on the release layout; extraction split across ranks (torchrun/srun), rank 0 reports."""
    from facescale.eval.dataset_extract import default_workers
    from facescale.eval.ijb import evaluate_ijb, table_text, write_outputs
    from facescale.eval.ijb_protocol import IJBMode

    require_writable(args.out, "--out")  # before an extraction of up to hours whose result goes there
    with model_on_ranks(args, "eval ijb") as (env, runtime, model, image_size):
        mode = IJBMode(flip=args.flip, norm_score=args.norm_score, detector_score=args.detector_score)
        workers = default_workers(env.local_world_size) if args.workers is None else args.workers
        res = evaluate_ijb(model, args.root, name=args.name, mode=mode, batch_size=args.batch_size,
                           device=runtime.device, rank=env.rank, world_size=env.world_size,
                           image_size=image_size, workers=workers, progress=env.rank == 0)
        if env.rank == 0:
            paths = write_outputs(res, args.out)
            print(table_text(res))
            summary = {k: v for k, v in res.items() if k not in ("scores", "labels")}
            print(json.dumps({"root": args.root, **summary, **paths}, default=str))
    return 0


def _make_bin(args: argparse.Namespace) -> int:
    from facescale.eval.make_bin import make_bin

    require_writable(args.out, "--out", is_file=True)
    n = make_bin(args.root, args.pairs, args.out, image_size=args.image_size)
    print(f"[make-bin] wrote {n} pairs to {args.out}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from facescale.commands.model_source import load_model_source
    from facescale.eval.onnx_export import export_onnx

    require_writable(args.out, "--out", is_file=True)
    model, image_size = load_model_source(args, "export onnx")
    res = export_onnx(model, args.out, image_size=image_size)
    print(f"[export] wrote {res['path']} (max abs diff vs torch {res['max_abs_diff']:.2e})")
    return 0


def _export_torch(args: argparse.Namespace) -> int:
    from facescale.checkpoint.export_torch import export_torch

    require_writable(args.out, "--out", is_file=True)
    report = export_torch(args.checkpoint, args.out)
    name, size = report["arcface_torch_name"], report["embedding_size"]
    loads = (f"arcface_torch loads it with get_model({name!r}, num_features={size})" if name else
             f"arcface_torch has no '{report['model']}' network: load it in facescale with "
             f"--weights {report['path']} --model {report['model']}")
    print(f"[export] wrote {report['path']}: {report['tensors']} fp32 tensors of '{report['model']}' "
          f"({size}-d); {loads}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="eval_command", required=True)
    v = esub.add_parser("verify", help="10-fold verification on insightface .bin sets")
    add_model_source_args(v, onnx=True)
    v.add_argument("--bin", nargs="+", required=True)
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--out", default="eval_results", help="directory for the ROC curve images")
    v.set_defaults(func=_verify)
    j = esub.add_parser("ijb", help="IJB-B/C 1:1 template verification on the official release layout")
    add_model_source_args(j, onnx=True)
    j.add_argument("--root", "--meta", dest="root", required=True,
                   help="release directory holding meta/<name>_*.txt and loose_crop/ (e.g. .../IJBC)")
    j.add_argument("--name", choices=("ijbb", "ijbc"), type=str.lower, default=None,
                   help="which set's meta files to read (default: the one present under --root/meta)")
    j.add_argument("--batch-size", type=int, default=128)
    j.add_argument("--workers", type=int, default=None,
                   help="decode/align processes per rank (default: the node's CPUs shared by its ranks)")
    j.add_argument("--out", default="eval_results", help="directory for the pair scores, ROC image and JSON")
    j.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="F1: sum the embeddings of each face and its mirror image (default on)")
    j.add_argument("--norm-score", action=argparse.BooleanOptionalAction, default=True,
                   help="N1: keep each face's embedding norm into template pooling (default on)")
    j.add_argument("--detector-score", action=argparse.BooleanOptionalAction, default=True,
                   help="D1: weight each face by its detector score (default on)")
    j.set_defaults(func=_ijb)

    m = sub.add_parser("make-bin", help="build an insightface .bin verification set from image folders")
    m.add_argument("--root", required=True)
    m.add_argument("--pairs", required=True, help="pairs file in LFW pairs.txt format")
    m.add_argument("--out", required=True)
    m.add_argument("--image-size", type=int, default=112)
    m.set_defaults(func=_make_bin)

    x = sub.add_parser("export", help="export a checkpoint")
    xsub = x.add_subparsers(dest="export_command", required=True)
    o = xsub.add_parser("onnx", help="ONNX with a dynamic batch axis, checked against torch")
    add_model_source_args(o)
    o.add_argument("--out", required=True)
    o.set_defaults(func=_export_onnx)
    t = xsub.add_parser("torch", help="the backbone as a plain fp32 state dict (arcface_torch backbone.pth)")
    t.add_argument("--checkpoint", required=True, help="facescale run dir, checkpoints dir or step dir")
    t.add_argument("--out", required=True, help="output file, e.g. backbone.pth")
    t.set_defaults(func=_export_torch)
