"""Load a `Config` from YAML plus `--set section.key=value` overrides; errors say how to fix them."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from facescale.config.errors import ConfigError, not_one_of, suggest
from facescale.config.eval_bins import resolve_eval_bins
from facescale.config.schedule_resolve import check_schedule_pairs
from facescale.config.schema import Config
from facescale.config.validate import validate

__all__ = ["ConfigError", "config_to_dict", "config_yaml", "dump_config", "load_config", "load_config_text"]

# F2C was `head.type: dcp` with a `head.dcp:` section, which reads as torch's "distributed checkpoint"
RENAMED_HEAD_TYPES = {"dcp": "f2c"}
RENAMED_HEAD_SECTIONS = {"dcp": "f2c"}


def migrate_renamed(raw: dict, source: str) -> dict:
    """Rewrite the old F2C names (`head.type: dcp`, `head.dcp`) to the new ones with a FutureWarning, so
    configs and checkpoints written before the rename keep loading; values under the new name win."""
    head = raw.get("head") if isinstance(raw, dict) else None
    if not isinstance(head, dict):
        return raw
    for old, new in RENAMED_HEAD_SECTIONS.items():
        if old in head:
            section = head.pop(old)
            if isinstance(section, dict) and isinstance(head.get(new), dict):
                section = {**section, **head[new]}
            head[new] = section
            warnings.warn(f"{source}: head.{old} is now head.{new}; loaded as head.{new} (rename it in the "
                          "file)", FutureWarning, stacklevel=3)
    old_type = head.get("type")
    if isinstance(old_type, str) and old_type in RENAMED_HEAD_TYPES:
        head["type"] = RENAMED_HEAD_TYPES[old_type]
        warnings.warn(f"{source}: head.type '{old_type}' is now '{head['type']}'; loaded as such (rename it "
                      "in the file)", FutureWarning, stacklevel=3)
    return raw


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type; raise ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = [str(a) for a in typing.get_args(hint)]
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"{where}: {not_one_of(value, allowed)}")
        return value
    if hint is Any or hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {hint}")


def _build(cls: type, data: dict, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{key}';{suggest(key, list(fields))}", where=where)
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            if value is None or value == "":
                raise ConfigError(f"section '{path}' is empty",
                                  fix=f"give it keys, or delete the '{path}' line to use the defaults")
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str, source: str) -> None:
    """Apply one `a.b.c=value` string to the raw mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"{source}: override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not raw.strip():
        raise ConfigError(f"{source}: override '{override}' has no value after '='",
                          fix=f"write {dotted.strip()}=VALUE (an empty list is [], an empty string \"\")")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{dotted}' goes through a non-mapping key '{k}'")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: override '{override}': the value is not valid YAML",
                          fix="quote it, e.g. key='a: b'") from None


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples become lists), ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None
) -> Config:
    """Read YAML at `path` (None = defaults), apply overrides, validate; raise ConfigError on any problem.

    Relative data paths are resolved against `base_dir` (default: the current directory).
    """
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", where=p,
                              fix="pass a YAML file; configs live in configs/, e.g. configs/synthetic.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    cfg = build_config(raw, overrides, source)
    expand_home(cfg)
    resolve_eval_bins(cfg)  # `eval.bins: [lfw]` -> <data.shards>/lfw.bin, as arcface_torch's val_targets
    validate(cfg, source)
    return cfg


def expand_home(cfg: Config) -> None:
    """`~` and `~user` at the start of the config's paths expanded as a shell does (YAML and --set leave
    them to us), in place."""
    cfg.data.shards = os.path.expanduser(cfg.data.shards)
    cfg.model.init_from = os.path.expanduser(cfg.model.init_from)
    cfg.head.init_from = os.path.expanduser(cfg.head.init_from)
    cfg.checkpoint.resume = os.path.expanduser(cfg.checkpoint.resume)
    cfg.logging.run_dir = os.path.expanduser(cfg.logging.run_dir)
    cfg.eval.bins = [os.path.expanduser(entry) for entry in cfg.eval.bins]


def build_config(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """A `Config` from a parsed YAML mapping plus `--set` overrides, types checked, paths not checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {raw!r}")
    for ov in overrides:
        _apply_override(raw, ov, f"{source} (--set)")
    check_schedule_pairs(raw, source)
    try:
        return _build(Config, migrate_renamed(raw, source), "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config_text(text: str, source: str) -> Config:
    """Parse a saved config (e.g. a checkpoint's config.yaml) without checking that its paths exist here."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return build_config(raw, (), source)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(config_yaml(cfg))
