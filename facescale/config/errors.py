"""`ConfigError` and the 'did you mean' hint shared by loading and validation."""

from __future__ import annotations

import difflib

from facescale.errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration problem, phrased for the user: where, which key, and the fix."""

    default_fix = "fix the config file or the --set value"


def did_you_mean(key: str, known: list[str]) -> str:
    """' did you mean X?' for a close match among `known`, else ''."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" did you mean '{close[0]}'?" if close else ""


def suggest(key: str, known: list[str], kind: str = "keys") -> str:
    """' did you mean X?' for a close match among `known`, else ' known <kind>: ...' listing them."""
    return did_you_mean(key, known) or f" known {kind}: {', '.join(sorted(known))}"


def not_one_of(value: object, allowed: list[str]) -> str:
    """"'v' is not one of a, b, c" and, for a close match, "; did you mean 'b'?"."""
    hint = did_you_mean(str(value), allowed)
    return f"'{value}' is not one of {', '.join(allowed)}" + (f";{hint}" if hint else "")


def check(ok: bool, source: str, key: str, message: str) -> None:
    """Raise `ConfigError('<source>: <key>: <message>')` unless `ok`."""
    if not ok:
        raise ConfigError(f"{source}: {key}: {message}")
