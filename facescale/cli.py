"""The `facescale` command; each subcommand lives in `facescale.commands.<name>` and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from facescale.errors import debug_enabled, report_errors

COMMAND_MODULES = ("train", "synth", "eval", "embed", "plan", "data", "checkpoint", "import_config")


class _ExactOptionParser(argparse.ArgumentParser):
    """Options are taken only as spelled in full: `plan --gpus 64` is an error, not `--gpus-per-node 64`.
    Subcommand parsers are built with the parent's class, so this holds for every subcommand."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _ExactOptionParser(prog="facescale", description="Face recognition training at scale.")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of input errors (also FACESCALE_DEBUG=1); allowed anywhere")
    # `deepspeed --module facescale train ...` runs `facescale --local_rank=N train ...` (unless its
    # --no_local_rank); LOCAL_RANK in the environment, which launcher/env.py reads, says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"facescale.commands.{name}").register(sub)
    return p


def command_name(args: argparse.Namespace) -> str:
    """`facescale eval verify`, `facescale train`...: the words the user typed to choose the command."""
    words = [args.command] + [getattr(args, k) for k in ("eval_command", "export_command", "format")
                              if getattr(args, k, None)]
    return " ".join(["facescale", *words])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    return report_errors(command_name(args), lambda: _run(args), debug=debug)


def _run(args: argparse.Namespace) -> int:
    from facescale.plugins import load_plugins

    load_plugins()  # out-of-tree backbones and modes register before the command reads a config or checkpoint
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
