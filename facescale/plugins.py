"""Out-of-tree backbones and training modes: the modules that register them are imported before a command.

A plug-in is a module whose import runs `@register_backbone(...)` and/or `register_mode(...)`. It is named by
the environment variable FACESCALE_PLUGINS (comma-separated module names, importable from sys.path) or by an
installed package's `facescale.plugins` entry point. `facescale` loads both at the start of every command, in
every process it runs in (torchrun, `deepspeed`, `srun` and Slurm's batch scripts pass the environment on),
so a checkpoint of a plug-in model evaluates, exports and reshards wherever the variable is set.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from facescale.errors import InputError

PLUGINS_ENV = "FACESCALE_PLUGINS"
ENTRY_POINT_GROUP = "facescale.plugins"

_loaded: list[str] = []


class PluginError(InputError):
    """A named plug-in does not import."""


def plugin_names() -> list[tuple[str, str]]:
    """(where it is named, module or entry point) for every plug-in: the variable's, then entry points'."""
    named = [(PLUGINS_ENV, n.strip()) for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for point in entry_points(group=ENTRY_POINT_GROUP):
        named.append((f"entry point '{point.name}' of group {ENTRY_POINT_GROUP}", point.value))
    return named


def load_plugins() -> list[str]:
    """Import every plug-in once per process; returns the modules imported so far. A module that fails to
    import is a PluginError naming it, where it was named and the failure (its traceback under --debug)."""
    for where, target in plugin_names():
        if target in _loaded:
            continue
        module = target.split(":", 1)[0]  # an entry point may name `module:attribute`; importing is enough
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            raise PluginError(
                f"plug-in '{module}' (from {where}) failed to import: {type(exc).__name__}: {exc}",
                fix=f"make it importable (on PYTHONPATH or installed) or remove it from {PLUGINS_ENV}; "
                "run with --debug for its traceback",
            ) from exc
        _loaded.append(target)
    return list(_loaded)
