"""Verification sets that ship beside an insightface `.rec` (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) are
copied into the converted directory, where `eval.bins: [lfw, cfp_fp]` finds them by name."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_verification_sets(rec_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy every readable `.bin` of `rec_dir` into `out_dir`; lines saying what was copied or skipped."""
    from facescale.eval.binfile import EvalSetError, read_bin

    lines = []
    for path in sorted(Path(rec_dir).glob("*.bin")):
        try:
            pairs = len(read_bin(path).issame)
        except EvalSetError as exc:
            lines.append(f"not copied {path.name}: {exc}")
            continue
        target = Path(out_dir) / path.name
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        lines.append(f"copied {path.name} ({pairs} pairs): eval.bins: [{path.stem}] evaluates it")
    return lines
