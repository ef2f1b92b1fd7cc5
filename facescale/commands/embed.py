"""`facescale embed`: embeddings of aligned face crops as `.npy` + path list (as inference.py, in bulk)."""

from __future__ import annotations

import argparse
import json

from facescale.commands.model_source import add_model_source_args, model_on_ranks


def _embed(args: argparse.Namespace) -> int:
    """Images are listed before the model loads; extraction is split across ranks, rank 0 writes the
    rows as they arrive from the others (no rank holds all of them)."""
    from facescale.eval.dataset_extract import default_workers
    from facescale.eval.embed_images import embed_images, list_images, output_paths, write_embeddings
    from facescale.eval.rows_file import check_writable

    paths = list_images(args.images, args.list, args.root)
    check_writable(output_paths(args.out)[0])  # before the model loads and the images are embedded
    with model_on_ranks(args, "embed") as (env, runtime, model, image_size):
        workers = default_workers(env.local_world_size) if args.workers is None else args.workers
        rows, skipped = embed_images(model, paths, image_size, batch_size=args.batch_size,
                                     device=runtime.device, flip=args.flip, rank=env.rank,
                                     world_size=env.world_size, workers=workers, progress=env.rank == 0,
                                     skip_bad=args.skip_bad)
        left_out = set(skipped)
        kept = [path for index, path in enumerate(paths) if index not in left_out]
        npy, txt = write_embeddings(args.out, rows, kept, normalize=args.normalize, rank=env.rank,
                                    skipped=[paths[index] for index in skipped])
        if env.rank == 0:
            print(json.dumps({"embeddings": str(npy), "paths": str(txt), "images": len(kept),
                              "skipped": len(skipped), "dim": rows.dim, "flip": args.flip,
                              "normalized": args.normalize}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("embed", help="embeddings of aligned face crops (a folder, files or a list) as .npy",
                       description="Embed aligned face crops of the model's input size (112x112 for "
                                   "arcface_torch models) with the training normalisation. Writes OUT.npy "
                                   "([N, D] float32, row i = line i of OUT.txt, the image paths in order: "
                                   "folders sorted recursively, then the files, then --list).")
    add_model_source_args(e, onnx=True)
    e.add_argument("images", nargs="*", help="image folders (searched recursively) or image files")
    e.add_argument("--list", help="a text file with one image path a line (relative ones start at --root)")
    e.add_argument("--root", default="", help="directory that relative --list paths start from (default: .)")
    e.add_argument("--out", required=True, help="OUT or OUT.npy: writes OUT.npy and OUT.txt")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=None,
                   help="decode processes per rank (default: the node's CPUs shared by its ranks)")
    e.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="sum each face's embedding with its mirror image's, as verification scores "
                        "(default on; --no-flip: the plain forward of arcface_torch's inference.py)")
    e.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False,
                   help="L2-normalise each row (default off: the norm is kept, a quality signal; the cosine "
                        "similarity of two faces is the dot product of their normalised rows)")
    e.add_argument("--skip-bad", action="store_true",
                   help="leave out an image that cannot be read or decoded or has another size (named on "
                        "stderr and in OUT.skipped.txt) instead of stopping; OUT.npy and OUT.txt hold the "
                        "rest")
    e.set_defaults(func=_embed)
