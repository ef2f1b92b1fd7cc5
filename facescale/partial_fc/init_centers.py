"""Class centers from outside a run (`head.init_from`): arcface_torch's per-GPU `checkpoint_gpu_<r>.pt`
(`save_all_states`) or its first PartialFC's `rank_<r>_softmax_weight.pt`, or one [C, D] tensor (`facescale
export-head`), so a run can start from another run's classifier instead of random centers, e.g. to go on
with a half-trained arcface_torch run.

Files are memory-mapped and read with `weights_only=True` (no code runs); each rank reads only its own rows.
arcface_torch's PartialFC_V2 holds rank r's contiguous block of the classes in `state_dict_softmax_fc.weight`,
the first C % W ranks one row more, so the blocks in rank order are the full matrix.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from facescale.checkpoint.arcface_torch import NotCarried, read_checkpoint, saved_optimizer
from facescale.checkpoint.safe_load import TRUST_FIX, unsafe_reason
from facescale.errors import InputError

ARCFACE_TORCH_HEAD_KEY = "state_dict_softmax_fc"  # PartialFC_V2.state_dict(): {"weight": [rows, D]}
_SHARD_NAME = re.compile(r"checkpoint_gpu_(\d+)\.pt")
# arcface_torch's first PartialFC (2021) saved each rank's rows and their SGD momentum as bare tensors
_V1_NAME = re.compile(r"rank_(\d+)_softmax_weight\.pt")
_V1_NAME_FORMAT, _V1_MOMENTUM = "rank_{}_softmax_weight.pt", "rank_{}_softmax_weight_mom.pt"


class CenterSourceError(InputError, ValueError):
    """head.init_from cannot be read as class centers; the message names the file."""

    every_rank = True  # every rank reads the same files and meets the same problem
    default_fix = ("give head.init_from an arcface_torch output directory (checkpoint_gpu_*.pt, saved with "
                   "save_all_states, or rank_*_softmax_weight.pt) or a [C, D] tensor written by `facescale "
                   "export-head`")


@dataclass(frozen=True)
class CenterSource:
    """Where the rows of a full [num_classes, dim] center matrix are: (file, first class, rows) in order."""

    pieces: tuple[tuple[Path, int, int], ...]
    num_classes: int
    dim: int


def _load(path: Path) -> object:
    try:
        return read_checkpoint(path)
    except pickle.UnpicklingError as exc:  # the weights-only loader refused it: nothing in it ran
        raise CenterSourceError(f"refusing to load it: {unsafe_reason(exc)}", where=path,
                                fix=TRUST_FIX) from None
    except Exception as exc:  # noqa: BLE001 - unreadable or unsafe: one message
        raise CenterSourceError(f"not a readable torch file ({type(exc).__name__})", where=path) from None


def _rows_of(obj: object, path: Path) -> torch.Tensor:
    """The center rows a file holds: the tensor itself, or arcface_torch's softmax-fc weight."""
    if isinstance(obj, dict):
        fc = obj.get(ARCFACE_TORCH_HEAD_KEY)
        obj = fc.get("weight") if isinstance(fc, dict) else None
        if obj is None:
            raise CenterSourceError(f"no {ARCFACE_TORCH_HEAD_KEY}.weight (an arcface_torch checkpoint saved "
                                    "with save_all_states has it)", where=path)
    if not torch.is_tensor(obj) or obj.dim() != 2 or not obj.is_floating_point():
        raise CenterSourceError("holds no [classes, embedding] float tensor", where=path)
    return obj


def _arcface_torch_files(directory: Path) -> list[Path]:
    """Every rank's file in rank order: checkpoint_gpu_<r>.pt, else the first PartialFC's tensors."""
    files = list(directory.iterdir())
    layouts = [({int(m.group(1)): p for p in files if (m := pattern.fullmatch(p.name))}, name)
               for pattern, name in ((_SHARD_NAME, "checkpoint_gpu_{}.pt"), (_V1_NAME, _V1_NAME_FORMAT))]
    found, name = next(((found, name) for found, name in layouts if found), ({}, ""))
    if not found:
        raise CenterSourceError("no checkpoint_gpu_<rank>.pt (or rank_<rank>_softmax_weight.pt) files",
                                where=directory)
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CenterSourceError(f"{name.format(missing[0])} is missing ({len(found)} of "
                                f"{max(found) + 1} ranks' files are there); copy every rank's file",
                                where=directory)
    return [found[r] for r in range(len(found))]


def open_center_source(path: str | Path) -> CenterSource:
    """Check `path` (a directory of arcface_torch checkpoints, or one file); map where each class's row is."""
    path = Path(path)
    if not path.exists():
        raise CenterSourceError("no such file or directory", where=path)
    files = _arcface_torch_files(path) if path.is_dir() else [path]
    pieces, start, dims = [], 0, set()
    for file in files:
        rows = _rows_of(_load(file), file)
        pieces.append((file, start, rows.shape[0]))
        start, dims = start + rows.shape[0], dims | {rows.shape[1]}
    if len(dims) != 1:
        raise CenterSourceError(f"the files hold rows of widths {sorted(dims)}; they are not from one run",
                                where=path)
    counts = [rows for _, _, rows in pieces]
    if max(counts) - min(counts) > 1 or counts != sorted(counts, reverse=True):
        raise CenterSourceError(f"per-rank row counts {counts} are not one run's even split of {start} "
                                "classes; give every checkpoint_gpu_*.pt of one run", where=path)
    return CenterSource(tuple(pieces), start, dims.pop())


def read_center_rows(source: CenterSource, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of the full matrix as fp32, read from the files that hold them."""
    parts = []
    for file, first, rows in source.pieces:
        lo, hi = max(start, first), min(start + count, first + rows)
        if lo < hi:
            parts.append(_rows_of(_load(file), file)[lo - first:hi - first].float())
    return torch.cat(parts) if parts else torch.empty(0, source.dim)


def _saved_center_state(file: Path) -> tuple[str, dict[str, torch.Tensor], object]:
    """(kind, {state name: the file's rows}, Adam's step) of one rank's file; NotCarried says why none."""
    match = _V1_NAME.fullmatch(file.name)
    if match is None:
        saved = saved_optimizer(_load(file))
        return saved.kind, saved.centers, saved.step
    momentum = file.with_name(_V1_MOMENTUM.format(match.group(1)))
    if not momentum.is_file():
        raise NotCarried(f"no {momentum.name} beside {file.name}")
    return "sgd", {"momentum_buffer": _rows_of(_load(momentum), momentum)}, None


def read_center_state_rows(source: CenterSource, start: int,
                           count: int) -> tuple[str | None, dict[str, torch.Tensor], object]:
    """(optimizer kind, {state name: rows [start, start + count)}, Adam's step) from the arcface_torch files'
    `state_optimizer` (each file's second parameter group: its rank's center rows; for the first PartialFC's
    files, the `_mom` tensors beside them); kind None for no rows; NotCarried says why there is none."""
    kinds, parts, step = set(), [], None
    for file, first, rows in source.pieces:
        lo, hi = max(start, first), min(start + count, first + rows)
        if lo >= hi:
            continue
        kind, centers, saved_step = _saved_center_state(file)
        kinds.add(kind)
        step = saved_step if saved_step is not None else step
        for name, value in centers.items():
            if value.shape[0] != rows:
                raise NotCarried(f"{file.name}'s {name} has {value.shape[0]} rows, its centers {rows}")
        parts.append((hi - lo, {k: v[lo - first:hi - first].float() for k, v in centers.items()}))
    if len(kinds) > 1:
        raise NotCarried(f"the files were saved by different optimizers ({', '.join(sorted(kinds))})")
    names = {k for _, state in parts for k in state}
    rows_state = {k: torch.cat([part.get(k, torch.zeros(n, source.dim)) for n, part in parts]) for k in names}
    return (kinds.pop() if kinds else None), rows_state, step


def _ranks_beside(file: Path) -> int:
    """How many rank files of `file`'s layout its folder holds (0: `file` is not a per-rank file)."""
    for pattern in (_SHARD_NAME, _V1_NAME):
        if pattern.fullmatch(file.name):
            return sum(bool(pattern.fullmatch(p.name)) for p in file.parent.iterdir())
    return 0


def check_center_source(source: CenterSource, num_classes: int, dim: int,
                        key: str = "head.init_from") -> None:
    """The source's matrix is [num_classes, dim] (the run's identities and embedding size)."""
    first = source.pieces[0][0]
    if len(source.pieces) == 1 and _ranks_beside(first) > 1 and source.num_classes != num_classes:
        raise CenterSourceError(f"{key} names one rank's file of a multi-GPU arcface_torch run", where=first,
                                fix=f"give the directory {first.parent} instead, for every rank's classes")
    if (source.num_classes, source.dim) != (num_classes, dim):
        raise CenterSourceError(
            f"{key} holds {source.num_classes} centers of width {source.dim}, this run needs {num_classes} "
            f"of width {dim} (data.shards identities, model.embedding_size)",
            where=source.pieces[0][0].parent if len(source.pieces) > 1 else source.pieces[0][0],
            fix="train on the data set and embedding size those centers were learned for")
