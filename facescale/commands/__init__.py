"""Subcommands of the `facescale` CLI; each module exposes `register(subparsers)`."""
