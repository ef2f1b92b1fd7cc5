"""Every input error ends in one line `facescale <command>: error: <what and where>; <what to do>`.

The table drives bad inputs through the CLI (in process, as `facescale.cli.main`) and checks the line, the
exit code, that no traceback is printed and that no output directory was created or changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from facescale.cli import main
from facescale.errors import INPUT_ERROR_EXIT_CODE, InputError, report_errors

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One bad input: the argv (after `facescale`), the command words and a fragment the line must hold."""

    name: str
    argv: Callable[[Path], list[str]]
    command: str
    expect: str
    outputs: list[str] = field(default_factory=list)  # paths under tmp_path that must stay untouched


_SHARDS: list[Path] = []


def _shards(tmp: Path) -> Path:
    """A small real shard directory (made once per session, next to the first test's tmp dir)."""
    if not _SHARDS:
        from facescale.data.synth import synthesize

        out = tmp.parent / "input_error_shards"
        synthesize(out, identities=8, images_per_identity=2, holdout_identities=4, seed=0, verify_pairs=20,
                   overwrite=True)
        _SHARDS.append(out)
    return _SHARDS[0]


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(f"data: {{shards: {_shards(tmp)}}}\n{text}")
    return str(path)


def _train(tmp: Path, *sets: str, config: str | None = None) -> list[str]:
    argv = ["train", "--config", config or "configs/synthetic.yaml", "--set", f"data.shards={_shards(tmp)}",
            "--set", f"logging.run_dir={tmp / 'run'}", "--set", "eval.bins=[]"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _broken_bin(tmp: Path) -> str:
    path = tmp / "broken.bin"
    path.write_bytes(b"not a pickle at all")
    return str(path)


CASES = [
    Case("missing config file", lambda t: ["train", "--config", str(t / "nope.yaml")], "facescale train",
         "nope.yaml: config file not found"),
    Case("unknown key", lambda t: _train(t, "head.sample_rat=0.1"), "facescale train",
         "unknown key 'sample_rat'", ["run"]),
    Case("--set section= (nothing after it)", lambda t: _train(t, "head="), "facescale train",
         "'head=' has no value", ["run"]),
    Case("--set key= (nothing after it)", lambda t: _train(t, "head.sample_rate="), "facescale train",
         "'head.sample_rate=' has no value", ["run"]),
    Case("model: null in YAML", lambda t: ["train", "--config", _yaml(t, "model: null\n")],
         "facescale train", "section 'model' is empty"),
    Case("empty head: in YAML", lambda t: ["train", "--config", _yaml(t, "head:\n")],
         "facescale train", "section 'head' is empty"),
    Case("empty nested section", lambda t: _train(t, "head.margin=null"), "facescale train",
         "section 'head.margin' is empty", ["run"]),
    Case("missing data directory", lambda t: _train(t, f"data.shards={t / 'absent'}"), "facescale train",
         "does not exist", ["run"]),
    Case("missing eval .bin in the config", lambda t: _train(t, f"eval.bins=[{t / 'lfw.bin'}]"),
         "facescale train", "lfw.bin", ["run"]),
    Case("broken eval .bin in the config", lambda t: _train(t, f"eval.bins=[{_broken_bin(t)}]"),
         "facescale train", "broken.bin: not an insightface .bin", ["run"]),
    Case("eval verify: missing checkpoint",
         lambda t: ["eval", "verify", "--checkpoint", str(t / "ck"), "--bin", _broken_bin(t), "--out",
                    str(t / "out")], "facescale eval verify", "broken.bin", ["out"]),
    Case("reshard: world size 0",
         lambda t: ["reshard", "--checkpoint", str(t / "ck"), "--world-size", "0", "--out", str(t / "o")],
         "facescale reshard", "--world-size must be >= 1", ["o"]),
    Case("reshard: missing checkpoint",
         lambda t: ["reshard", "--checkpoint", str(t / "ck"), "--world-size", "2", "--out", str(t / "o")],
         "facescale reshard", "does not exist", ["o"]),
    Case("export-head: missing checkpoint",
         lambda t: ["export-head", "--checkpoint", str(t / "ck"), "--out", str(t / "h.pt")],
         "facescale export-head", "does not exist", ["h.pt"]),
    Case("validate: not a shard directory", lambda t: ["validate", str(t)], "facescale validate",
         "manifest.json"),
    Case("make-bin: missing pairs file",
         lambda t: ["make-bin", "--root", str(t), "--pairs", str(t / "pairs.txt"), "--out", str(t / "x.bin")],
         "facescale make-bin", "pairs.txt", ["x.bin"]),
]


def _snapshot(root: Path, names: list[str]) -> dict[str, object]:
    """What exists at each output path (None = absent; else its files and their sizes)."""
    state: dict[str, object] = {}
    for name in names:
        path = root / name
        if not path.exists():
            state[name] = None
        elif path.is_file():
            state[name] = path.stat().st_size
        else:
            state[name] = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*")
                                 if p.is_file())
    return state


def assert_one_line_error(err: str, command: str, expect: str) -> str:
    """stderr holds exactly one line, `<command>: error: ...; ...` containing `expect`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"{command}: error: "), line
    assert expect in line, line
    assert "; " in line.split(": error: ", 1)[1], f"no 'what to do' part: {line}"
    assert "Traceback" not in err
    return line


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_input_error_is_one_line(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("FACESCALE_DEBUG", raising=False)
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    argv = case.argv(tmp_path)
    before = _snapshot(tmp_path, case.outputs)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == INPUT_ERROR_EXIT_CODE, (out, err)
    assert_one_line_error(err, case.command, case.expect)
    assert _snapshot(tmp_path, case.outputs) == before


def test_error_line_parts():
    exc = InputError("label 7 outside [0, 5)", where="train-000001.tar: sample 'k3'", fix="repair the shard")
    assert exc.line() == "train-000001.tar: sample 'k3': label 7 outside [0, 5); repair the shard"

    class Defaulted(InputError):
        default_fix = "do the usual thing"

    assert Defaulted("bad\nthing").line() == "bad thing; do the usual thing"


def _raise_input_error() -> int:
    raise InputError("broken", where="x.bin", fix="rebuild it")


def test_only_rank_zero_prints_before_the_process_group(capsys, monkeypatch):
    monkeypatch.delenv("FACESCALE_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert report_errors("facescale train", _raise_input_error) == INPUT_ERROR_EXIT_CODE
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert report_errors("facescale train", _raise_input_error) == INPUT_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "facescale train: error: x.bin: broken; rebuild it\n"


def test_debug_shows_the_traceback(tmp_path):
    """`--debug` (anywhere on the command line) or FACESCALE_DEBUG=1 add the traceback before the line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FACESCALE_DEBUG", None)
    for argv, extra in ((["--debug"], {}), ([], {"FACESCALE_DEBUG": "1"})):
        proc = subprocess.run([sys.executable, "-m", "facescale", "validate", str(tmp_path), *argv],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == INPUT_ERROR_EXIT_CODE
        assert "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("facescale validate: error: ")
