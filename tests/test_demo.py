"""`make demo` (facescale/demo.py): which synthetic set it trains on (none is synthesized here)."""

from __future__ import annotations

import json
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
    ("synth(seed=0, identities=2000, images_per_identity=16, holdout_identities=300)", 112),  # README's
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
