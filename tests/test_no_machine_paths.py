"""Committed files carry no absolute paths of the machine that produced them (commands are repo-relative)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# home directories, this project's work area and scratch space of the producing machine
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home/\w+|tmp)/[\w.-]")


def test_committed_files_have_no_machine_paths() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    hits = []
    for name in files.split():
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue  # tests build such paths on purpose (tmp_path) and may name them in assertions
        text = (ROOT / name).read_text(errors="replace")
        hits += [f"{name}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert hits == [], "write commands and paths relative to the repository root:\n" + "\n".join(hits[:20])
