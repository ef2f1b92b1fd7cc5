"""Crafted checkpoint files never run code.

For every file of a real step directory, a copy of the step gets that file replaced by a pickle that would
create a marker file when unpickled; every command that reads that file is run on the copy. The marker must
never appear and the error must name the file. A control shows that the payload does create the marker when
loaded the unsafe way. Old-format rank states (numpy RNG arrays) still load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# every file of a 1-rank step directory and the commands that read it ("resume_consolidated": a resume that
# reads the world-size-free backbone files, as after `facescale reshard` or on another number of ranks)
READERS = {
    "backbone/mp_rank_00_model_states.pt": ["resume"],
    "backbone/zero_pp_rank_0_mp_rank_00_optim_states.pt": ["resume"],
    "backbone.pt": ["resume_consolidated", "eval_verify", "eval_ijb", "export_onnx", "export_torch",
                    "reshard", "init_from"],
    "backbone_optim.pt": ["resume_consolidated", "reshard"],
    "head/shard-00000-of-00001.pt": ["resume", "reshard", "export_head"],
    "state/rank-00000.pt": ["resume", "reshard"],
    "trainer.json": ["resume", "eval_verify", "export_onnx", "export_torch", "reshard", "export_head",
                     "init_from"],
    "config.yaml": ["eval_verify", "eval_ijb", "export_onnx", "export_torch"],
}
NEVER_READ = {"COMPLETE", "zero_to_fp32.py", "zero_to_torch.py"}  # DeepSpeed's scripts are never run
TRAIN_COMMANDS = {"resume", "resume_consolidated", "init_from"}  # each a `facescale train` process


class _Plant:
    """Unpickling this calls open(marker, "w"): the file appears only if code from the pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    if path.suffix == ".pt":
        torch.save(_Plant(str(marker)), path)  # a well-formed torch zip whose data.pkl calls open()
    else:
        path.write_bytes(pickle.dumps(_Plant(str(marker))))


def _cli(argv: list[str]) -> str:
    """Run `facescale ARGV` in this process; its stderr and any exception, as text."""
    from facescale.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
        return f"exit {code}: {err.getvalue()}"
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue()}"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc} {err.getvalue()}"


def _train(data: Path, run_dir: Path, steps: int, resume: str = "none", init_from: str = "") -> str:
    """`facescale train` in a process of its own (DeepSpeed keeps process-wide state); its stderr."""
    overrides = [f"data.shards={data}", "eval.bins=[]", f"logging.run_dir={run_dir}",
                 f"schedule.steps={steps}", "schedule.warmup_steps=0", "schedule.global_batch_size=8",
                 "data.num_workers=0", f"checkpoint.resume={resume}", "checkpoint.every_steps=0",
                 "deepspeed.zero_stage=1"]  # ZeRO-1 writes the optimizer-state file READERS lists
    overrides += [f"model.init_from={init_from}"] if init_from else []
    cmd = [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml"]
    for override in overrides:
        cmd += ["--set", override]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return "trained" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-4000:]}"


def _run_command(command: str, step: Path, work: Path, data: Path) -> str:
    if command in ("resume", "resume_consolidated"):
        if command == "resume_consolidated":
            state = json.loads((step / "trainer.json").read_text())
            (step / "trainer.json").write_text(json.dumps({**state, "has_deepspeed_files": False}))
        return _train(data, work / "resumed", 2, resume=str(step))
    if command == "init_from":
        return _train(data, work / "fine-tuned", 1, init_from=str(step))
    argv = {
        "eval_verify": ["eval", "verify", "--checkpoint", str(step), "--bin", str(data / "verify.bin"),
                        "--out", str(work / "eval")],
        "eval_ijb": ["eval", "ijb", "--checkpoint", str(step), "--meta", str(work / "no-ijb")],
        "export_onnx": ["export", "onnx", "--checkpoint", str(step), "--out", str(work / "m.onnx")],
        "reshard": ["reshard", "--checkpoint", str(step), "--world-size", "2", "--out", str(work / "out")],
        "export_torch": ["export", "torch", "--checkpoint", str(step), "--out", str(work / "backbone.pth")],
        "export_head": ["export-head", "--checkpoint", str(step), "--out", str(work / "centers.pt")],
    }[command]
    return _cli(argv)


def _attack(name: str, command: str, source: Path, root: Path, data: Path) -> dict:
    """One case: a copy of the step with `name` replaced by the planted pickle, read by `command`."""
    work = root / f"{name.replace('/', '_')}-{command}"
    step = work / "step_00000001"
    shutil.copytree(source, step)
    marker = work / "MARKER"
    plant(step / name, marker)
    message = _run_command(command, step, work, data)
    case = {"file": name, "command": command, "message": message, "marker": marker.exists()}
    shutil.rmtree(work, ignore_errors=True)
    return case


def drive(data: str, out: str) -> None:
    """Subprocess body: train one step, then attack every file with every reader; results as JSON. The cases
    that start a `facescale train` process run two at a time in worker threads; the in-process commands stay
    on this thread, since `_cli` redirects the process-wide stderr."""
    root, data_dir = Path(out), Path(data)
    print(_train(data_dir, root / "source", 1), flush=True)
    source = root / "source" / "checkpoints" / "step_00000001"
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    cases = [(name, command) for name, commands in READERS.items() for command in commands]
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = [pool.submit(_attack, *case, source, root, data_dir) for case in cases
                   if case[1] in TRAIN_COMMANDS]
        in_process = [_attack(*case, source, root, data_dir) for case in cases
                      if case[1] not in TRAIN_COMMANDS]
        results = {"files": files, "cases": [future.result() for future in started] + in_process}
    (root / "results.json").write_text(json.dumps(results, indent=1))


def test_planted_pickle_runs_code_when_loaded_unsafely(tmp_path: Path):
    """The control: without the weights-only loader the payload does create the marker."""
    marker = tmp_path / "MARKER"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_every_checkpoint_file_is_read_without_running_code(tmp_path: Path):
    from facescale.data.synth import synthesize

    synthesize(tmp_path / "data", identities=12, images_per_identity=2, holdout_identities=4, seed=0,
               verify_pairs=20, image_size=112)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    data = str(tmp_path / "data")
    code = f"from tests.test_hostile_checkpoint import drive; drive({data!r}, {str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert (tmp_path / "results.json").is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["files"]) == set(READERS) | NEVER_READ, "a step file has no readers listed here"
    assert len(results["cases"]) == sum(len(commands) for commands in READERS.values())
    failures = []
    for case in results["cases"]:
        short = case["file"].rsplit("/", 1)[-1]
        refused = not case["message"].startswith(("trained", "exit 0"))
        if case["marker"] or short not in case["message"] or not refused:
            failures.append(case)
    assert not failures, json.dumps(failures, indent=1)


def test_old_rank_state_with_numpy_rng_still_loads(tmp_path: Path):
    """Rank states written before the numpy RNG was stored as a tensor hold numpy arrays: they still load,
    through an allow-list of exactly numpy's array and dtype reconstruction."""
    import random

    import numpy as np

    from facescale.checkpoint.rank_state import set_rng_state
    from facescale.checkpoint.safe_load import LEGACY_RANK_STATE_GLOBALS, UnsafeCheckpointError, safe_load

    np.random.seed(11)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    old = {"rng": {**rng, "cuda": None}, "buffers": {}, "loader": {"epoch": 1, "position": 3}}
    expected = np.random.rand(4)
    torch.save(old, tmp_path / "rank-00000.pt")
    with pytest.raises(UnsafeCheckpointError, match="rank-00000.pt"):
        safe_load(tmp_path / "rank-00000.pt")  # without the legacy allow-list
    state = safe_load(tmp_path / "rank-00000.pt", LEGACY_RANK_STATE_GLOBALS)
    np.random.rand(7)
    set_rng_state(state["rng"])
    assert np.array_equal(np.random.rand(4), expected) and state["loader"] == {"epoch": 1, "position": 3}


def _save_load_stage(rank: int, world: int, root: str, stage: int, optimizer: str) -> list[str]:
    """Save under ZeRO `stage` and resume at the same world size: DeepSpeed's own files, read through the
    weights-only loader with its allow-list; returns the globals its files hold."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    from facescale.deepspeed_ops import skip_unused_ops

    skip_unused_ops()  # no JIT build of DeepSpeed's inference-only comm op (minutes on a fresh venv)

    from facescale.checkpoint import CheckpointManager
    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8))
    opt = (torch.optim.AdamW(model.parameters(), lr=0.1) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    config = {"train_batch_size": 2, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    loss = engine(torch.randn(2, 3)).square().sum()
    engine.backward(loss)
    engine.step()
    head = build_head(HeadConfig(), 5, 8, seed=1)
    manager = CheckpointManager(root, rank, world)
    step_dir = manager.save(1, engine, head, {"seed": 0}, "x: 1\n")
    manager.load(root, engine, build_head(HeadConfig(), 5, 8, seed=2))
    return sorted({g for f in (step_dir / "backbone").rglob("*.pt")
                   for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)})


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "optimizer"), [(0, "sgd"), (1, "adamw"), (2, "sgd"), (3, "adamw")])
def test_deepspeed_files_resume_through_the_safe_loader(tmp_path: Path, stage: int, optimizer: str):
    from tests.distributed import run_ranks

    needed = run_ranks(_save_load_stage, 1, str(tmp_path), stage, optimizer, timeout=600)[0]
    from facescale.checkpoint.safe_load import DEEPSPEED_GLOBALS, allowed_globals

    allowed = {f"{g.__module__}.{g.__name__}" for g in allowed_globals(DEEPSPEED_GLOBALS)}
    assert set(needed) <= allowed, needed


def test_a_checkpoint_file_cut_at_any_length_is_one_error_naming_it(tmp_path: Path) -> None:
    """A file cut short (a copy interrupted, a node lost mid-write outside facescale) fails as a
    CheckpointError that names it at every length; torch's zip reader raises a bare OSError (EINVAL) at
    some of them, which became a traceback blaming a crashed rank."""
    from facescale.checkpoint.layout import CheckpointError
    from facescale.checkpoint.safe_load import safe_load

    whole = tmp_path / "shard.pt"
    torch.save({"centers": torch.randn(300, 64), "momentum_buffer": torch.randn(300, 64), "start": 7}, whole)
    data = whole.read_bytes()
    for tenth in range(1, 10):
        cut = tmp_path / f"cut{tenth}.pt"
        cut.write_bytes(data[: len(data) * tenth // 10])
        with pytest.raises(CheckpointError, match=f"cut{tenth}.pt' is not readable"):
            safe_load(cut)
