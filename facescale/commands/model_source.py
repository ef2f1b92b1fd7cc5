"""`--checkpoint RUN|STEP`, `--weights FILE --model NAME [--embedding-size N]` or `--onnx FILE`: the backbone
a command uses.

Shared by `eval verify`, `eval ijb`, `embed` (all three sources) and `export onnx` (the first two), so a
downloaded arcface_torch `backbone.pth` or a model zoo ONNX file is evaluated without a fake run directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_IMAGE_SIZE = 112  # arcface_torch's crops; a facescale checkpoint brings its own data.image_size


def add_model_source_args(parser: argparse.ArgumentParser, onnx: bool = False) -> None:
    """Add the exclusive --checkpoint / --weights (+ --model, --embedding-size) [/ --onnx] options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="facescale run dir, checkpoints dir or step dir")
    source.add_argument("--weights", help="a backbone state dict: arcface_torch backbone.pth or facescale "
                                          "backbone.pt (needs --model)")
    if onnx:
        source.add_argument("--onnx", help="an ONNX face model (facescale export onnx, arcface_torch's "
                                           "torch2onnx.py, insightface's model zoo), run by onnxruntime")
    parser.add_argument("--model", help="backbone name for --weights (r50, r100, mbf, vit_t, ...)")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="embedding size for --weights (default: read from the file)")


def load_model_source(args: argparse.Namespace, command: str) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode, image size) from the parsed options; bad input raises an InputError that the
    CLI prints as one line naming `command`'s option."""
    from facescale.checkpoint import load_backbone
    from facescale.checkpoint.weights import Settings, WeightsError, backbone_from_weights
    from facescale.models.registry import list_backbones

    if args.checkpoint or getattr(args, "onnx", None):
        if args.model or args.embedding_size:
            option = "--checkpoint" if args.checkpoint else "--onnx model"
            raise WeightsError("--model and --embedding-size go with --weights",
                               fix=f"drop them: a {option} brings its own model settings ({command})")
    if getattr(args, "onnx", None):
        from facescale.eval.onnx_model import OnnxBackbone

        model = OnnxBackbone(args.onnx)
        return model, model.image_size
    if args.checkpoint:
        model, cfg = load_backbone(args.checkpoint)
        return model, cfg.data.image_size
    if not args.model:
        raise WeightsError("--weights needs --model NAME",
                           fix=f"add --model, one of {', '.join(list_backbones())}")
    settings = Settings(model="--model", embedding_size="--embedding-size", lenient=None)  # all keys or none
    return backbone_from_weights(args.weights, args.model, args.embedding_size, settings), DEFAULT_IMAGE_SIZE


@contextmanager
def model_on_ranks(args: argparse.Namespace, command: str) -> Iterator[tuple]:
    """The launch's ranks (one process group when several), the device, and the model on it: (env, runtime,
    model, image_size); the group is shut down on the way out."""
    from facescale.parallel.init import init_distributed, shutdown_distributed
    from facescale.runtime import select_runtime
    from launcher.env import resolve_dist_env

    env = resolve_dist_env()
    runtime = select_runtime(env.local_rank)
    if env.world_size > 1:
        init_distributed(env, runtime)
    try:
        model, image_size = load_model_source(args, command)
        yield env, runtime, model.to(runtime.device), image_size
    finally:
        shutdown_distributed()
