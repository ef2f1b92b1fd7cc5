"""`ConfigError` and the 'did you mean' hint shared by loading and validation."""

from __future__ import annotations

import difflib

from facescale.errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration problem, phrased for the user: where, which key, and the fix."""

    default_fix = "fix the config file or the --set value"


def suggest(key: str, known: list[str]) -> str:
    """' did you mean X?' for a close match among `known`, else the list of known values."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else f" known keys: {', '.join(sorted(known))}"


def check(ok: bool, source: str, key: str, message: str) -> None:
    """Raise `ConfigError('<source>: <key>: <message>')` unless `ok`."""
    if not ok:
        raise ConfigError(f"{source}: {key}: {message}")
