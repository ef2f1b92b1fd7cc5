"""`eval.bins` entries may name a verification set (`lfw`, `cfp_fp`) as arcface_torch's `val_targets` do:
a name without a directory or `.bin` suffix is looked up as `<data.shards>/<name>.bin`, where
`facescale convert rec` copies the sets that ship beside an insightface `.rec`."""

from __future__ import annotations

import os
from pathlib import Path

from facescale.config.schema import Config


def is_set_name(entry: str) -> bool:
    """`lfw` is a name; `lfw.bin`, `data/lfw.bin` and `/x/lfw` are paths."""
    return "/" not in entry and "\\" not in entry and not entry.endswith(".bin")


def eval_set_name(path: str) -> str:
    """The name a set is reported under (TensorBoard tags, best accuracy, result.json): its file name without
    the suffix, as arcface_torch's `val_targets` name them."""
    return os.path.splitext(os.path.basename(path))[0]


def resolve_eval_bins(cfg: Config) -> None:
    """Replace each name in `cfg.eval.bins` by `<data.shards>/<name>.bin` (in place; paths stay as given)."""
    if not cfg.data.shards:
        return
    cfg.eval.bins = [str(Path(cfg.data.shards) / f"{entry}.bin") if is_set_name(entry) and not
                     Path(entry).is_file() else entry for entry in cfg.eval.bins]
