"""Subcommands of the `facescale` CLI; each module exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound for None)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"'{value}' is not an integer {span}")
        return number

    return parse
