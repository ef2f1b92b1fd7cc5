"""Mode registry: `head.type` names a mode; built-in modes are modules loaded on first use, others register.

Adding a mode: a package with a module that defines `MODE = YourMode()` (a `TrainingMode`), plus one line in
`BUILTIN_MODES`; an out-of-tree mode calls `register_mode(YourMode())` in a plug-in module
(facescale/plugins.py: FACESCALE_PLUGINS or a `facescale.plugins` entry point). A built-in name is never
taken over by another mode.
"""

from __future__ import annotations

import difflib
import importlib

from facescale.modes.base import TrainingMode

BUILTIN_MODES = {
    "partial_fc": "facescale.partial_fc.mode",
    "f2c": "facescale.f2c.mode",
}

_MODES: dict[str, TrainingMode] = {}


class UnknownModeError(ValueError):
    """`head.type` names no registered training mode."""


def register_mode(mode: TrainingMode) -> TrainingMode:
    """Add `mode` under `mode.name`; registering another object under a taken or built-in name is refused."""
    name = getattr(mode, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"training mode {type(mode).__name__} has no `name`; set the class attribute")
    if name in BUILTIN_MODES:
        builtin = _MODES.get(name) or importlib.import_module(BUILTIN_MODES[name]).MODE
        if builtin is not mode:
            raise ValueError(f"training mode '{name}' is built in ({BUILTIN_MODES[name]}); give "
                             f"{type(mode).__name__} a name of its own")
    if name in _MODES and _MODES[name] is not mode:
        raise ValueError(f"training mode '{name}' is already registered by {type(_MODES[name])}")
    _MODES[mode.name] = mode
    return mode


def list_modes() -> list[str]:
    """Sorted names `head.type` accepts."""
    return sorted({*BUILTIN_MODES, *_MODES})


def get_mode(name: str) -> TrainingMode:
    """The mode called `name` (a built-in one is imported on first use)."""
    if name not in _MODES and name in BUILTIN_MODES:
        mode = importlib.import_module(BUILTIN_MODES[name]).MODE
        if mode.name != name:
            raise ValueError(f"{BUILTIN_MODES[name]}.MODE is named '{mode.name}', registered as '{name}'")
        register_mode(mode)
    if name not in _MODES:
        close = difflib.get_close_matches(str(name), list_modes(), n=1, cutoff=0.6)
        hint = f" did you mean '{close[0]}'?" if close else ""
        raise UnknownModeError(f"head.type: unknown training mode '{name}';{hint} known modes: "
                               f"{', '.join(list_modes())} (a plug-in's mode is known once its module is "
                               f"loaded: FACESCALE_PLUGINS=module)")
    return _MODES[name]


def all_modes() -> list[TrainingMode]:
    """Every registered mode (built-in ones imported)."""
    return [get_mode(name) for name in list_modes()]
