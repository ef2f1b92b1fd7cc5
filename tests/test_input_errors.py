"""Every input error ends in one line `facescale <command>: error: <what and where>; <what to do>`.

The table drives bad inputs through the CLI (in process, as `facescale.cli.main`) and checks the line, the
exit code, that no traceback is printed and that no output directory was created or changed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from facescale.cli import main
from facescale.data.loader import dali_available
from facescale.errors import INPUT_ERROR_EXIT_CODE, InputError, as_input_error, report_errors

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
                   workers=1,
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


def _tiny_bin(tmp: Path) -> str:
    """A readable .bin of 4 pairs (too few for 10 folds)."""
    from facescale.eval.binfile import read_bin, write_bin

    images, issame = read_bin(_shards(tmp) / "verify.bin")
    return str(write_bin(tmp / "tiny.bin", images[:8], issame[:4]))


def _bad_manifest(tmp: Path) -> str:
    d = tmp / "badmanifest"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text("{not json")
    return str(d)


def _incomplete_step(tmp: Path) -> str:
    """A step directory a crash left behind: files but no COMPLETE marker."""
    step = tmp / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True, exist_ok=True)
    (step / "trainer.json").write_text("{}")
    return str(step)


def _garbage(tmp: Path, name: str, data: bytes = b"\x00garbage" * 10) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _weights(tmp: Path) -> str:
    """A real `demo` backbone state dict (what `--weights FILE --model demo` reads)."""
    import torch

    from facescale.config.schema import ModelConfig
    from facescale.models.registry import build_backbone

    path = tmp / "demo.pth"
    torch.manual_seed(0)
    torch.save(build_backbone(ModelConfig(name="demo", embedding_size=16)).state_dict(), path)
    return str(path)


def _pairs(tmp: Path, text: str) -> str:
    path = tmp / "pairs.txt"
    path.write_text(text)
    return str(path)


def _copy_shards(tmp: Path) -> Path:
    """A private copy of the small shard directory, to damage."""
    import shutil

    copy = tmp / "shards_copy"
    if not copy.exists():
        shutil.copytree(_shards(tmp), copy)
    return copy


def _shifted_index(tmp: Path) -> str:
    """Shards whose first `.idx` has every offset moved by 512 B (DALI used to segfault on it)."""
    copy = _copy_shards(tmp)
    index = copy / "train-000000.idx"
    lines = index.read_text().splitlines()
    body = []
    for line in lines[1:]:
        parts = line.split()
        body.append(" ".join(str(int(p) + 512) if i % 4 == 1 else p for i, p in enumerate(parts)))
    index.write_text("\n".join([lines[0], *body]) + "\n")
    return str(copy)


def _garbled_jpeg(tmp: Path) -> tuple[str, str]:
    """Shards with random bytes over the second half of one JPEG (sizes and offsets unchanged); its key."""
    from facescale.data.bad_data import check_image, read_index_lines

    copy = _copy_shards(tmp)
    tar = copy / "train-000000.tar"
    sample = next(iter(read_index_lines(copy / "train-000000.idx")))
    offset, size = sample.members["jpg"]
    data = bytearray(tar.read_bytes())
    start = offset + size // 2
    data[start:offset + size - 2] = bytes((i * 97 + 13) % 256 for i in range(offset + size - 2 - start))
    tar.write_bytes(bytes(data))
    assert check_image(bytes(data[offset:offset + size]), 112) is not None
    return str(copy), sample.key


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
    Case("eval.bins with fewer pairs than folds", lambda t: _train(t, f"eval.bins=[{_tiny_bin(t)}]"),
         "facescale train", "tiny.bin: 4 pairs, but the 10-fold protocol needs at least 10", ["run"]),
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
    Case("train: manifest.json is not JSON", lambda t: _train(t, f"data.shards={_bad_manifest(t)}"),
         "facescale train", "manifest.json", ["run"]),
    Case("train: .idx offsets shifted by 512 B", lambda t: _train(t, f"data.shards={_shifted_index(t)}"),
         "facescale train", "train-000000.idx: line 2 puts", ["run"]),
    Case("train: shards smaller than one batch", lambda t: _train(t, "schedule.global_batch_size=64"),
         "facescale train", "16 samples, fewer than one batch of 64 for each of 1 ranks", ["run"]),
    Case("train f2c: fewer identities than one identity batch",
         lambda t: _train(t, "schedule.global_batch_size=16", config="configs/synthetic_f2c.yaml"),
         "facescale train", "32 identities per rank x 1 ranks is more than the 8 identities", ["run"]),
    Case("validate: manifest.json is not JSON", lambda t: ["validate", _bad_manifest(t)],
         "facescale validate", "manifest.json"),
    Case("eval verify: incomplete step directory",
         lambda t: ["eval", "verify", "--checkpoint", _incomplete_step(t), "--bin",
                    str(_shards(t) / "verify.bin"), "--out", str(t / "out")],
         "facescale eval verify", "step_00000010", ["out", "run"]),
    Case("eval verify: weights file is not a state dict",
         lambda t: ["eval", "verify", "--weights", _garbage(t, "backbone.pth"), "--model", "demo", "--bin",
                    str(_shards(t) / "verify.bin"), "--out", str(t / "out")],
         "facescale eval verify", "backbone.pth", ["out"]),
    Case("export onnx: missing weights file",
         lambda t: ["export", "onnx", "--weights", str(t / "none.pth"), "--model", "demo", "--out",
                    str(t / "m.onnx")], "facescale export onnx", "none.pth", ["m.onnx"]),
    Case("eval ijb: not an IJB release",
         lambda t: ["eval", "ijb", "--weights", _weights(t), "--model", "demo", "--root", str(t), "--out",
                    str(t / "out")], "facescale eval ijb", "meta", ["out"]),
    Case("make-bin: malformed pairs file",
         lambda t: ["make-bin", "--root", str(t), "--pairs", _pairs(t, "10 300\nAlice 1 2 3 4 5\n"),
                    "--out", str(t / "x.bin")], "facescale make-bin", "pairs.txt:2", ["x.bin"]),
    Case("convert rec: missing .rec",
         lambda t: ["convert", "rec", "--rec", str(t / "train.rec"), "--idx", str(t / "train.idx"), "--out",
                    str(t / "conv")], "facescale convert rec", "train.", ["conv"]),
    Case("synth: output directory holds shards",
         lambda t: ["synth", "--out", str(_shards(t)), "--identities", "2", "--images-per-identity", "1",
                    "--holdout-identities", "0"], "facescale synth", "already holds shards"),
    Case("synth: no identities", lambda t: ["synth", "--out", str(t / "s"), "--identities", "0"],
         "facescale synth", "identities >= 1", ["s"]),
    Case("synth: one held-out identity",
         lambda t: ["synth", "--out", str(t / "s"), "--holdout-identities", "1"],
         "facescale synth", "holdout_identities >= 2", ["s"]),
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
    for key in list(os.environ):  # a single process, whatever launched the tests
        if key in LAUNCH_VARS or key.startswith(("SLURM_", "OMPI_", "PMI_")):
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
    # as a DataLoader worker's error comes back: the class called with the worker's traceback as message
    wrapped = Defaulted("Caught Defaulted in DataLoader worker process 0.\nOriginal Traceback (most recent "
                        "call last):\n  File \"x.py\", line 1, in f\n    raise Defaulted(...)\n"
                        "tests.Defaulted: shard 3: bad label; repair it\n")
    assert wrapped.line() == "shard 3: bad label; repair it"
    # an OSError a worker raised comes back as OSError(its traceback), its message ending with a newline
    worker_os_error = OSError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback "
                              "(most recent call last):\n  File \"x.py\", line 1, in f\nFileNotFoundError: "
                              "[Errno 2] No such file or directory: '/d/train-000002.tar'\n")
    assert as_input_error(worker_os_error).line() == \
        "[Errno 2] No such file or directory: '/d/train-000002.tar'; check the path and its permissions"


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


@pytest.mark.parametrize("every_rank", [False, True])
def test_after_the_process_group_the_raising_rank_prints(capsys, monkeypatch, every_rank):
    """A rank's own error (its data) is printed by that rank, naming it; one every rank raises, by rank 0."""
    from facescale.parallel import failure

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def run() -> int:
        failure._JOB.update(rank=1, world=2, store=None)  # as after init_distributed (no store to report to)
        exc = InputError("bad label", where="train-000003.tar: sample 'k'", fix="repair it")
        exc.every_rank = every_rank
        raise exc

    try:
        assert report_errors("facescale train", run) == INPUT_ERROR_EXIT_CODE
    finally:
        failure.forget()
    expected = "" if every_rank else (f"facescale train: error: rank 1 on {socket.gethostname()}: "
                                      "train-000003.tar: sample 'k': bad label; repair it\n")
    assert capsys.readouterr().err == expected


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


@pytest.mark.parametrize("same", [True, False])
def test_one_class_verification_set_reports_accuracy_without_roc(tmp_path, capsys, monkeypatch, same):
    """Only same (or only different) pairs: `eval verify` prints an accuracy and says why there is no ROC."""
    import json

    from facescale.eval.binfile import read_bin, write_bin

    monkeypatch.chdir(REPO)
    images, issame = read_bin(_shards(tmp_path) / "verify.bin")
    pairs = [i for i, flag in enumerate(issame) if flag == same][:10]
    assert len(pairs) == 10
    one_class = tmp_path / "one_class.bin"
    write_bin(one_class, [images[2 * i + k] for i in pairs for k in (0, 1)], [same] * len(pairs))
    rc = main(["eval", "verify", "--weights", _weights(tmp_path), "--model", "demo", "--bin", str(one_class),
               "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    if same:  # each held-out pair is accepted when it is not the farthest of the ten
        assert 0.0 <= report["accuracy"] <= 1.0
    else:  # threshold 0 (reject everything) is the first best on every fold
        assert report["accuracy"] == pytest.approx(1.0)
    assert "no ROC" in report["roc_skipped"] and "roc_image" not in report
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["webdataset"] + (["dali"] if dali_available() else []))
def test_corrupt_jpeg_stops_training_with_one_line_under_both_readers(tmp_path, reader):
    """`facescale train` with random bytes inside a JPEG: one line naming shard and key, exit 2, no step."""
    shards, key = _garbled_jpeg(tmp_path)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "FACESCALE_DEBUG"}
    argv = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={shards}", f"data.reader={reader}", "data.on_bad_sample=error",
                 "data.num_workers=1", "data.shuffle_buffer=4", f"logging.run_dir={run_dir}", "eval.bins=[]",
                 "schedule.steps=8", "schedule.warmup_steps=0", "schedule.global_batch_size=4",
                 "checkpoint.every_steps=0"):
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                "FACESCALE_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == INPUT_ERROR_EXIT_CODE, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_one_line_error(errors[0], "facescale train",
                          f"train-000000.tar: sample '{key}': JPEG does not decode")
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("step_*"))


def test_torchruns_failure_summary_names_the_reason(tmp_path, monkeypatch, capsys):
    """Under torchrun each worker has a TORCHELASTIC_ERROR_FILE; the one-line reason written there is what
    torch's agent shows as the root cause (parsed here with torch's own ProcessFailure), instead of "To enable
    traceback see: <link>"; a bug's traceback goes there as torch's `record` writes it."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from facescale.config.errors import ConfigError
    from facescale.errors import report_errors

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def bad_config() -> int:
        raise ConfigError("schedule.steps: must be > 0", where="c.yaml", fix="fix the config file")

    assert report_errors("facescale train", bad_config) == INPUT_ERROR_EXIT_CODE
    line = capsys.readouterr().err.strip()
    assert line == "facescale train: error: c.yaml: schedule.steps: must be > 0; fix the config file"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["message"] == line

    error_file.unlink()

    def bug() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        report_errors("facescale train", bug)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert "RuntimeError: a bug" in failure.message["extraInfo"]["py_callstack"]
