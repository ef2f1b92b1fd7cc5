"""The `facescale` command; each subcommand lives in `facescale.commands.<name>` and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from facescale.config.load import ConfigError

COMMAND_MODULES = ("train", "synth", "eval", "plan", "data", "checkpoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facescale", description="Face recognition training at scale.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"facescale.commands.{name}").register(sub)
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
