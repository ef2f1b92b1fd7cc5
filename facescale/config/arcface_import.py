"""`facescale import-config`: an arcface_torch Python config (EasyDict) as a facescale YAML.

The file is never executed: its syntax tree is walked and only `config = edict()` and `config.key = <value>`
statements are accepted, where a value is built from literals, arithmetic and earlier `config.key`s (e.g.
`config.warmup_epoch = config.num_epoch // 10`), bounded in size (MAX_INT_BITS, MAX_LENGTH) and of the kind
each key takes (KEY_KINDS). arcface_torch's `configs/base.py` defaults come first, as its
`get_config` merges them. Every key is mapped or explicitly ignored; an unknown key is refused by name.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facescale.data.known_sets import known_set_name
from facescale.errors import InputError

# arcface_torch configs/base.py
BASE_DEFAULTS: dict[str, Any] = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": None, "embedding_size": 512, "sample_rate": 1.0, "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "dali_aug": False, "gradient_acc": 1, "seed": 2048,
    "num_workers": 2,
}
# arcface_torch network -> (model.name, model.drop_path_rate, model.mask_ratio)
NETWORKS: dict[str, tuple[str, float | None, float | None]] = {
    **{n: (n, None, None) for n in ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large",
                                    "vit_t", "vit_s", "vit_b")},
    "vit_t_dp005_mask0": ("vit_t", 0.05, 0.0), "vit_s_dp005_mask_0": ("vit_s", 0.05, 0.0),
    "vit_b_dp005_mask_005": ("vit_b", 0.05, 0.05), "vit_l_dp005_mask_005": ("vit_l", 0.05, 0.05),
}
# keys with no facescale counterpart, and why they can be dropped
IGNORED = {
    "num_classes": "read from the converted data's manifest.json",
    "num_image": "read from the converted data's manifest.json (epochs -> steps)",
    "save_all_states": "facescale always saves the full state (backbone, centers, optimizers, data cursor)",
    "resume": "checkpoint.resume: auto continues this run from its own last checkpoint; to go on from an "
              "arcface_torch run's checkpoint_gpu_*.pt (save_all_states) set model.init_from to one of them "
              "and head.init_from to their directory (weights and class centers), and schedule.start_step "
              "to the global_step it prints (their optimizer state goes on too)",
    "wandb_key": "never written to a config file: export WANDB_API_KEY instead",
    "wandb_log_all": "facescale logs the same scalars to TensorBoard and W&B",
    "save_artifacts": "checkpoints stay in the run directory", "wandb_resume": "the run directory resumes",
    "suffix_run_name": "logging.wandb.name defaults to the run directory's name", "notes": "no counterpart",
}
MAPPED = {"margin_list", "network", "output", "embedding_size", "sample_rate", "fp16", "batch_size",
          "interclass_filtering_threshold", "optimizer", "lr", "momentum", "weight_decay", "verbose",
          "frequent", "dali", "dali_aug", "gradient_acc", "seed", "num_workers", "rec", "num_epoch",
          "warmup_epoch", "val_targets", "using_wandb", "wandb_entity", "wandb_project"}
# the shipped recipes' header line on the one schedule difference
WARMUP_NOTE = ("difference: warm-up runs step s at lr*(s+1)/warmup_steps (arcface_torch's scheduler runs its "
               "first batch at the full lr, then lr*s/warmup_steps: one batch later), then the same "
               "polynomial decay (power 1, PolynomialLRWarmup's default in train_v2.py)")
SGD_MOMENTUM = 0.9  # arcface_torch's train_v2.py: torch.optim.SGD(..., momentum=0.9); config.momentum unread
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# bounds on what an expression may build, far above any recipe's number or string (`10 ** 10 ** 8` would run
# for hours and `"x" * 10 ** 12` fill the memory: both are refused before they are computed)
MAX_INT_BITS = 256
MAX_LENGTH = 10_000  # characters of a string, items of a list / tuple / dict


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (True is an int to Python, never a count or rate in a recipe)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


# what a key the file sets must be (as arcface_torch uses it); anything else is refused by file:line and key
KEY_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{k: ("an integer", _is_integer) for k in (
        "embedding_size", "batch_size", "verbose", "frequent", "gradient_acc", "seed", "num_workers",
        "num_classes", "num_image")},
    **{k: ("a number", _is_number) for k in (
        "sample_rate", "interclass_filtering_threshold", "lr", "momentum", "weight_decay", "num_epoch",
        "warmup_epoch")},
    **{k: ("True or False", lambda v: isinstance(v, bool)) for k in (
        "fp16", "dali", "dali_aug", "using_wandb")},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in ("network", "optimizer")},
    **{k: ("a string or None", lambda v: v is None or isinstance(v, str)) for k in (
        "output", "rec", "wandb_entity", "wandb_project")},
    "margin_list": ("(m1, m2, m3) of numbers",
                    lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_number, v))),
    "val_targets": ("a list of names",
                    lambda v: isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v)),
}


class ImportConfigError(InputError):
    """An arcface_torch config that cannot be read or mapped."""

    default_fix = "edit the Python config (only `config.key = value` lines are read) or write the YAML"


def _shown(node: ast.AST) -> str:
    """The source of `node`, cut to fit an error line."""
    text = ast.unparse(node)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(node: ast.AST, values: dict[str, Any], where: str) -> Any:
    """Evaluate a literal / arithmetic / `config.key` expression without executing anything."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return _bounded(node.value, node, where)
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(e, values, where) for e in node.elts]
        return _bounded(tuple(items) if isinstance(node, ast.Tuple) else items, node, where)
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values, strict=True)
        try:
            mapping = {_value(k, values, where): _value(v, values, where) for k, v in pairs}
        except TypeError as exc:  # a list or dict as a key
            raise ImportConfigError(f"'{_shown(node)}' cannot be computed ({exc})", where=where) from None
        return _bounded(mapping, node, where)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, values, where), _value(node.right, values, where)
        return _arithmetic(node, left, right, where)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _value(node.operand, values, where)
        if not isinstance(operand, (int, float)):
            raise ImportConfigError(f"'{_shown(node)}' is arithmetic on a non-number", where=where)
        return _UNARY[type(node.op)](operand)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config":
        if node.attr not in values:
            raise ImportConfigError(f"config.{node.attr} is read before it is set", where=where)
        return values[node.attr]
    raise ImportConfigError(f"'{_shown(node)}' is not a literal, arithmetic or an earlier config.key",
                            where=where)


def _arithmetic(node: ast.BinOp, left: Any, right: Any, where: str) -> Any:
    """`left op right` for numbers, or strings / lists / tuples joined (+) or repeated (* n); refused by
    expression when it cannot be computed or would exceed MAX_INT_BITS / MAX_LENGTH (checked beforehand)."""
    op = type(node.op)
    if op not in (ast.Add, ast.Mult) and not all(isinstance(v, (int, float)) for v in (left, right)):
        raise ImportConfigError(f"'{_shown(node)}' is arithmetic on a non-number", where=where)
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) \
            and left.bit_length() * right > MAX_INT_BITS:
        raise ImportConfigError(f"'{_shown(node)}' is larger than {MAX_INT_BITS} bits", where=where)
    lengths = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
    counts = [v for v in (left, right) if isinstance(v, int)]
    if op is ast.Mult and lengths and counts and lengths[0] * counts[0] > MAX_LENGTH:
        raise ImportConfigError(f"'{_shown(node)}' has over {MAX_LENGTH} characters or items", where=where)
    try:
        result = _BINARY[op](left, right)
    except (ArithmeticError, TypeError, ValueError) as exc:  # 1 / 0, 10.0 ** 400, "a" - 1
        raise ImportConfigError(f"'{_shown(node)}' cannot be computed ({exc})", where=where) from None
    return _bounded(result, node, where)


def _size(value: Any) -> int:
    """Characters and items in `value`, nested ones included, counted up to just past MAX_LENGTH (a list
    repeating one long list is small in memory but not when printed)."""
    size, pending = 0, [value]
    while pending and size <= MAX_LENGTH:
        item = pending.pop()
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            pending += item
        size += len(item) if isinstance(item, (str, list, tuple, dict)) else 0
    return size


def _bounded(value: Any, node: ast.AST, where: str) -> Any:
    """`value`, refused when it exceeds MAX_INT_BITS or MAX_LENGTH (a recipe's values are far smaller)."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ImportConfigError(f"'{_shown(node)}' is larger than {MAX_INT_BITS} bits", where=where)
    if _size(value) > MAX_LENGTH:
        raise ImportConfigError(f"'{_shown(node)}' has over {MAX_LENGTH} characters or items", where=where)
    return value


def read_arcface_config(path: str | Path) -> dict[str, Any]:
    """The keys of an arcface_torch config file over base.py's defaults, read without running the file."""
    p = Path(path)
    try:  # bytes: Python's own decoding (UTF-8 or the file's coding line); a bad byte is a SyntaxError
        tree = ast.parse(p.read_bytes(), filename=str(p))
    except OSError as exc:
        raise ImportConfigError(f"cannot read it ({exc.strerror})", where=p,
                                fix="give the path of an arcface_torch configs/*.py file") from None
    except SyntaxError as exc:  # a null byte has no line
        raise ImportConfigError(f"not valid Python: {exc.msg}",
                                where=f"{p}:{exc.lineno}" if exc.lineno else p) from None
    except ValueError as exc:
        raise ImportConfigError(f"not valid Python: {exc}", where=p) from None
    except (RecursionError, MemoryError):  # the parser's own limits: 1+1+...+1 or -----...1 in thousands
        raise ImportConfigError("not valid Python: an expression nested too deeply to parse",
                                where=p) from None
    values = dict(BASE_DEFAULTS)
    for stmt in tree.body:
        where = f"{p}:{stmt.lineno}"
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue  # `from easydict import EasyDict as edict`: nothing is imported
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            raise ImportConfigError(f"'{ast.unparse(stmt)[:60]}' is not a `config.key = value` line",
                                    where=where)
        target = stmt.targets[0]
        if isinstance(target, ast.Name) and target.id == "config" and isinstance(stmt.value, ast.Call):
            continue  # config = edict()
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "config"):
            raise ImportConfigError(f"'{ast.unparse(stmt)[:60]}' is not a `config.key = value` line",
                                    where=where)
        try:
            value = _value(stmt.value, values, where)
        except RecursionError:
            raise ImportConfigError("the expression is nested too deeply", where=where) from None
        kind, fits = KEY_KINDS.get(target.attr, ("", None))
        if fits is not None and not fits(value):
            raise ImportConfigError(f"config.{target.attr} = {_shown(stmt.value)} is not {kind}", where=where)
        values[target.attr] = value
    return values


def _margin(margin: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """head.margin for what arcface_torch's CombinedMarginLoss computes from (m1, m2, m3), and notes: ArcFace
    cos(theta + m2) for (1, m2, 0), CosFace target - m3 whenever m3 > 0 (m1, m2 unread), else it raises."""
    m1, m2, m3 = (float(v) for v in margin)
    if m1 == 1.0 and m3 == 0.0:  # arcface_torch's forward cos(theta + m2), gradient passed straight through
        return {"type": "arcface_straight_through", "s": 64.0, "m1": m1, "m2": m2, "m3": m3}, []
    if m3 > 0.0:
        unread = [f"m{i} = {v:g}" for i, v, default in ((1, m1, 1.0), (2, m2, 0.0)) if v != default]
        note = (f"margin_list {tuple(margin)!r} -> cosface m3 = {m3:g}: once m3 > 0 arcface_torch's "
                f"CombinedMarginLoss takes the target logit less m3, never reading {' and '.join(unread)}")
        return {"type": "cosface", "s": 64.0, "m1": 1.0, "m2": 0.0, "m3": m3}, [note] if unread else []
    raise ImportConfigError(
        f"margin_list {tuple(margin)!r}: arcface_torch's CombinedMarginLoss raises for it (it computes only "
        "(1.0, m2, 0.0) as ArcFace and m3 > 0 as CosFace)", where=where,
        fix="use one of those, or write head.margin by hand (type: combined is cos(m1*theta + m2) - m3)")


def arcface_to_facescale(values: dict[str, Any], name: str, gpus: int | None = None,
                         source: str = "<config>") -> tuple[dict[str, Any], list[str]]:
    """(facescale config mapping, comment lines) for arcface_torch `values`; unknown keys are refused."""
    unknown = sorted(k for k in values if k not in MAPPED and k not in IGNORED)
    if unknown:
        raise ImportConfigError(f"key(s) {', '.join(unknown)} have no facescale mapping", where=source,
                                fix="remove them, or port them by hand after importing the rest")
    if values["network"] not in NETWORKS:
        raise ImportConfigError(f"network '{values['network']}' has no facescale backbone", where=source,
                                fix=f"use one of {', '.join(sorted(NETWORKS))}")
    if values["dali_aug"]:
        raise ImportConfigError("dali_aug = True (DALI's extra augmentation) is not supported", where=source,
                                fix="set it to False; data.random_shift/brightness/contrast are facescale's")
    if values["optimizer"] not in ("sgd", "adamw"):
        raise ImportConfigError(f"optimizer '{values['optimizer']}' is not sgd or adamw", where=source)
    model_name, drop_path, mask = NETWORKS[values["network"]]
    model: dict[str, Any] = {"name": model_name, "embedding_size": int(values["embedding_size"])}
    if drop_path is not None:
        model.update(drop_path_rate=drop_path, mask_ratio=mask)
    optimizer, lr, wd = values["optimizer"], float(values["lr"]), float(values["weight_decay"])
    margin, margin_notes = _margin(values["margin_list"], source)
    head: dict[str, Any] = {"type": "partial_fc", "sample_rate": float(values["sample_rate"]),
                            "margin": {**margin,
                                       "interclass_filtering_threshold":
                                           float(values["interclass_filtering_threshold"])},
                            "optimizer": optimizer, "update": "dense", "lr_scale": 1.0, "weight_decay": wd}
    optim: dict[str, Any] = {"name": optimizer, "lr": lr, "weight_decay": wd, "grad_clip": 5.0}
    momentum_notes: list[str] = []
    if optimizer == "sgd":
        head["momentum"] = optim["momentum"] = SGD_MOMENTUM
        momentum_notes = _momentum_notes(values["momentum"])
    accumulation_notes = _summed_gradients(optimizer, int(values["gradient_acc"]), optim, head)
    schedule: dict[str, Any] = {"power": 1.0, "seed": int(values["seed"]),
                                "grad_accumulation": int(values["gradient_acc"])}
    _require_epochs(values, source)
    schedule["epochs"] = values["num_epoch"]
    schedule["warmup_epochs"], schedule_notes = _warmup_epochs(values["warmup_epoch"])
    if gpus:
        schedule["global_batch_size"] = int(values["batch_size"]) * gpus * int(values["gradient_acc"])
    else:
        schedule["batch_per_rank"] = int(values["batch_size"])
    log_every, eval_every, every_notes = _every_steps(values)
    rec = str(values.get("rec") or "")
    known = None if rec == "synthetic" else known_set_name(values.get("num_classes", 0),
                                                            values.get("num_image", 0))  # a name plan knows
    shards = f"data/{known or Path(rec).name}" if known or rec else "data/train"
    output = values["output"] or f"runs/{name}"
    mapping = {
        "model": model,
        "data": {"shards": shards, "reader": "dali" if values["dali"] else "auto",
                 "num_workers": int(values["num_workers"])},
        "head": head, "optim": optim, "schedule": schedule,
        # arcface_torch's DDP = ZeRO stage 0 (gradients all-reduced during backward, parallel/grad_overlap.py)
        "deepspeed": {"zero_stage": 0, "precision": "bf16" if values["fp16"] else "fp32"},
        "checkpoint": {"resume": "auto"},
        "logging": {"run_dir": str(output), "every_steps": log_every},
        "eval": {"bins": list(values.get("val_targets") or []), "every_steps": eval_every},
    }
    if values.get("using_wandb"):
        mapping["logging"]["wandb"] = {"project": str(values.get("wandb_project") or name),
                                       "entity": str(values.get("wandb_entity") or "")}
    notes = [f"imported from arcface_torch config {source} by `facescale import-config`",
             "mapping: margin_list -> head.margin (s=64 as arcface_torch), batch_size -> schedule."
             + ("global_batch_size (x --gpus)" if gpus else "batch_per_rank") + ", num_epoch/warmup_epoch -> "
             "schedule.epochs/warmup_epochs, optimizer/lr/weight_decay -> optim.* and head.* (same settings "
             "for backbone and centers; SGD momentum 0.9 as train_v2.py builds it), fp16 -> "
             "deepspeed.precision bf16, DDP -> deepspeed.zero_stage 0, val_targets -> eval.bins (names in "
             "data.shards), verbose -> eval.every_steps, frequent -> logging.every_steps",
             *margin_notes, *momentum_notes, *accumulation_notes, *schedule_notes, WARMUP_NOTE, *every_notes,
             *_data_notes(rec, shards, values)]
    secret = {"wandb_key"}
    notes += [f"ignored {k}{'' if k in secret else f' = {values[k]!r}'}: {IGNORED[k]}"
              for k in sorted(values) if k in IGNORED]
    return mapping, notes


def _summed_gradients(optimizer: str, acc: int, optim: dict[str, Any], head: dict[str, Any]) -> list[str]:
    """arcface_torch accumulates by calling loss.backward() on each of gradient_acc batches (the gradients
    add up: acc x the mean) and clips that sum; facescale averages them. The same steps: the clip norm / acc,
    and for SGD lr x acc with weight decay / acc (its momentum buffer is then 1/acc of arcface_torch's);
    AdamW does not see a constant scale of the gradients. Rewrites `optim` and `head`; returns the note."""
    if acc <= 1:
        return []
    lr, wd, clip = optim["lr"], optim["weight_decay"], optim["grad_clip"]
    optim["grad_clip"] = clip / acc
    note = (f"gradient_acc = {acc}: arcface_torch sums the batches' gradients (and clips the sum at "
            f"{clip:g}), facescale averages them, so optim.grad_clip = {clip:g} / {acc}")
    if optimizer != "sgd":
        return [note + " (AdamW's steps do not depend on the gradients' scale)"]
    optim.update(lr=lr * acc, weight_decay=wd / acc)
    head["weight_decay"] = wd / acc
    return [note + f", optim.lr = {lr:g} x {acc}, optim.weight_decay and head.weight_decay = {wd:g} / {acc}: "
            f"the same SGD steps (momentum buffers 1/{acc} of arcface_torch's)"]


def _require_epochs(values: dict[str, Any], source: str) -> None:
    """Refuse a config without num_epoch / warmup_epoch: base.py sets neither and arcface_torch's train_v2.py
    reads both, so it would fail there (facescale would silently train its default step count)."""
    missing = [f"config.{k}" for k in ("num_epoch", "warmup_epoch") if k not in values]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ImportConfigError(f"{' and '.join(missing)} {verb} not set (arcface_torch's base.py has no "
                                "default and its train_v2.py would stop there)", where=source,
                                fix="set them as its recipes do, e.g. config.num_epoch = 20 and "
                                    "config.warmup_epoch = 0")


def _every_steps(values: dict[str, Any]) -> tuple[int, int, list[str]]:
    """(logging.every_steps, eval.every_steps, notes) for frequent / verbose: arcface_torch counts them in
    batches (global_step += 1 per batch), facescale in optimizer steps of gradient_acc batches each."""
    acc, frequent, verbose = int(values["gradient_acc"]), int(values["frequent"]), int(values["verbose"])
    if acc <= 1:
        return frequent, verbose, []
    log_every, eval_every = (max(1, int(n / acc + 0.5)) for n in (frequent, verbose))
    return log_every, eval_every, [
        f"frequent = {frequent}, verbose = {verbose} batches -> logging.every_steps: {log_every}, "
        f"eval.every_steps: {eval_every} (arcface_torch counts them in batches, facescale in optimizer steps "
        f"of gradient_acc = {acc} batches; rounded, at least 1)"]


def _momentum_notes(momentum: Any) -> list[str]:
    """A note when config.momentum is not 0.9, the momentum arcface_torch's SGD runs with whatever it says."""
    if float(momentum) == SGD_MOMENTUM:
        return []
    return [f"momentum = {momentum!r} -> optim.momentum and head.momentum: {SGD_MOMENTUM} (arcface_torch's "
            f"train_v2.py builds its SGD with momentum={SGD_MOMENTUM} and never reads config.momentum)"]


def _warmup_epochs(warmup: Any) -> tuple[Any, list[str]]:
    """schedule.warmup_epochs for arcface_torch's warmup_epoch, and a note when they differ: a negative one
    makes its warmup_step negative, and PolynomialLRWarmup then decays from lr at once (no warm-up), as 0."""
    if warmup >= 0:
        return warmup, []
    return 0, [f"warmup_epoch = {warmup!r} -> schedule.warmup_epochs: 0 (arcface_torch's warmup_step = "
               "num_image // total_batch_size x warmup_epoch is then negative and PolynomialLRWarmup decays "
               "from lr at the first step: no warm-up, as 0)"]


def _data_notes(rec: str, shards: str, values: dict[str, Any]) -> list[str]:
    """How to make `shards` from what `config.rec` names, as arcface_torch reads it: random images for
    "synthetic", else the folder's train.rec + train.idx, else its images as one folder per identity."""
    if rec == "synthetic":
        return ["arcface_torch's rec = 'synthetic' is random images; write synthetic shards with:",
                f"  facescale synth --out {shards} --identities {values.get('num_classes') or 'N'}"]
    return ["convert the data first (arcface_torch reads the folder's train.rec + train.idx, else its "
            "images as one folder per identity), with one of:",
            f"  facescale convert rec --rec {rec or 'RECDIR'}/train.rec --out {shards}",
            f"  facescale convert folder --root {rec or 'RECDIR'} --out {shards}"]


def import_config_yaml(path: str | Path, gpus: int | None = None) -> str:
    """The YAML text (with a comment header) for the arcface_torch config at `path`."""
    import textwrap

    import yaml

    values = read_arcface_config(path)
    mapping, notes = arcface_to_facescale(values, Path(path).stem, gpus, str(path))
    header = "".join(f"# {part}\n" for line in notes for part in textwrap.wrap(line, 106))
    return header + yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False)
