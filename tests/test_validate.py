"""`facescale validate`: a clean directory passes; every kind of damage is reported and exits non-zero."""

from __future__ import annotations

import pytest

from facescale.cli import main
from facescale.data.manifest import Manifest
from facescale.data.validate import validate_directory
from tests.test_bad_data import CASES, make_bad_dir


def test_clean_directory_passes_with_per_identity_counts(tmp_path, capsys):
    make_bad_dir(tmp_path, "good")
    report = validate_directory(tmp_path)
    assert report.ok and report.samples_checked == 12 and report.counts.tolist() == [1] * 12
    assert main(["validate", str(tmp_path), "--counts-csv", str(tmp_path / "counts.csv")]) == 0
    captured = capsys.readouterr()
    assert "no problems found" in captured.out and "validate: 100%" in captured.err  # progress bar
    assert (tmp_path / "counts.csv").read_text().splitlines()[:2] == ["label,images", "0,1"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_defect_is_reported_with_shard_key_and_reason(tmp_path, case, capsys):
    shard, key, reason = CASES[case]
    make_bad_dir(tmp_path, case)
    report = validate_directory(tmp_path)
    assert any(shard in p and key in p and reason in p for p in report.problems), report.problems
    assert any("identity 5" in p or "identity 8" in p for p in report.problems)  # counts vs manifest
    assert main(["validate", str(tmp_path)]) == 1
    assert "problems:" in capsys.readouterr().out


def test_changed_shard_fails_its_checksum_and_workers_agree(tmp_path):
    make_bad_dir(tmp_path, "good")
    tar = tmp_path / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1  # inside the end-of-archive padding: the samples still read
    tar.write_bytes(bytes(data))
    serial, parallel = validate_directory(tmp_path, workers=1), validate_directory(tmp_path, workers=2)
    assert serial.problems == parallel.problems
    assert any("sha256 differs" in p for p in serial.problems) and Manifest.load(tmp_path).num_samples == 12


def test_a_shard_cut_to_nothing_is_one_line_not_one_per_sample(tmp_path):
    make_bad_dir(tmp_path, "good")
    manifest = Manifest.load(tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(b"")
    lost = manifest.shards[0].num_samples
    report = validate_directory(tmp_path)
    cut = [p for p in report.problems if "cut off" in p]
    assert len(cut) == 1 and f"train-000000.tar: {lost} samples from '000000000' on cut off" in cut[0]
    assert "(0 B): the shard is truncated" in cut[0]
    assert not any("train-000000.tar: sample" in p for p in report.problems)
