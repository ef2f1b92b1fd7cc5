"""`make demo` (facescale/demo.py): which synthetic set it trains on, its batch at any rank count, and how a
failed training job ends it. No training runs here: the torchrun command is captured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from facescale import demo
from facescale.errors import InputError

DEMO_SOURCE = "synth(seed=7, identities=2000, images_per_identity=16, holdout_identities=300)"


def _data_dir(root: Path, source: str, image_size: int = 112) -> Path:
    """A directory whose manifest.json says it holds `source` (one shard listed), with a verify.bin."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "facescale-wds-1", "num_classes": 2, "num_samples": 2, "image_size": image_size,
                "source": source, "shards": [{"name": "train-000000.tar", "num_samples": 2, "sha256": "0"}],
                "samples_per_identity": [1, 1]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "verify.bin").write_bytes(b"")
    return root


@pytest.fixture
def synth_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every synthesize() the demo makes (none is run)."""
    calls: list[dict] = []

    def fake(out_dir, **kwargs):
        calls.append({"out_dir": Path(out_dir), **kwargs})
        return SimpleNamespace(num_samples=0, num_classes=0)

    monkeypatch.setattr("facescale.data.synth.synthesize", fake)
    return calls


def test_the_demo_set_is_reused(tmp_path, synth_calls, capsys):
    demo.ensure_data(_data_dir(tmp_path / "d", DEMO_SOURCE))
    assert synth_calls == [] and "reusing" in capsys.readouterr().out


@pytest.mark.parametrize("source, image_size", [
    ("synth(seed=0, identities=2000, images_per_identity=16, holdout_identities=300)", 112),  # seed 0
    ("synth(seed=7, identities=60, images_per_identity=8, holdout_identities=20)", 112),
    (DEMO_SOURCE, 64),
])
def test_another_synthetic_set_is_replaced_by_the_demo_set(tmp_path, synth_calls, source, image_size):
    data = _data_dir(tmp_path / "d", source, image_size)
    demo.ensure_data(data)
    assert synth_calls == [{"out_dir": data, "identities": 2000, "images_per_identity": 16,
                            "holdout_identities": 300, "seed": 7, "image_size": 112, "overwrite": True}]


def test_converted_data_is_refused_not_replaced(tmp_path, synth_calls):
    with pytest.raises(InputError, match="holds 'rec.*not the demo's synthetic identities.*make clean"):
        demo.ensure_data(_data_dir(tmp_path / "d", "rec(/data/ms1m/train.rec)"))
    assert synth_calls == []


def test_a_missing_set_is_synthesized(tmp_path, synth_calls):
    demo.ensure_data(tmp_path / "d")
    assert [(c["seed"], c["overwrite"]) for c in synth_calls] == [(7, False)]


def _demo_command(tmp_path, monkeypatch, argv: list[str], returncode: int) -> tuple[list[str], object]:
    """The torchrun command the demo runs for `argv`, and how main() ends when that exits `returncode`."""
    shards = tmp_path / "shards"  # enough for the config check; the captured job reads nothing
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    monkeypatch.setattr(demo, "ensure_data", lambda data_dir: None)
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode)

    monkeypatch.setattr(demo.subprocess, "run", run)
    with pytest.raises(SystemExit) as stop:
        demo.main([*argv, "--out", str(tmp_path / "runs"), "--set", f"data.shards={shards}", "--set",
                   "eval.bins=[]"])
    return commands[0], stop.value.code


def _batch(cmd: list[str]) -> list[str]:
    return [s for s in cmd if s.startswith("schedule.global_batch_size")]


@pytest.mark.parametrize("argv, ranks, batch", [
    ([], 2, []),  # the default: 128 splits, the command is the one the quoted accuracy came from
    (["--ranks", "3"], 3, ["schedule.global_batch_size=126"]),
    (["--ranks", "5", "--mode", "f2c"], 5, ["schedule.global_batch_size=120"]),  # an even share per rank
])
def test_the_global_batch_is_rounded_down_only_where_it_does_not_split(tmp_path, monkeypatch, argv, ranks,
                                                                        batch):
    cmd, _ = _demo_command(tmp_path, monkeypatch, argv, 1)
    assert _batch(cmd) == batch and f"--nproc_per_node={ranks}" in cmd


@pytest.mark.parametrize("returncode, code", [(1, 1), (2, 2), (-9, 137)])
def test_a_failed_job_ends_the_demo_with_its_exit_code(tmp_path, monkeypatch, capsys, returncode, code):
    _, exit_code = _demo_command(tmp_path, monkeypatch, ["--ranks", "3"], returncode)
    assert exit_code == code and "Traceback" not in capsys.readouterr().err
