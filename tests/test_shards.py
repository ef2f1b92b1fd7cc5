"""Shard writer (tar + DALI index), label payloads and manifest.json checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from facescale.data.jpeg import encode_jpeg
from facescale.data.manifest import MANIFEST_FORMAT, Manifest, ManifestError
from facescale.data.shard_writer import ShardWriter, decode_label, encode_label, index_tar
from facescale.data.synth_faces import render_identity


def _write(out_dir, count=7, shard_size=3):
    samples = [(bytes([i % 251]) * (100 + 37 * i), 1_000_003 * i % 2_000_000) for i in range(count)]
    with ShardWriter(out_dir, shard_size) as writer:
        for jpeg, label in samples:
            writer.write(jpeg, label)
    return samples, writer.shards


def test_labels_are_little_endian_int32():
    assert encode_label(1) == b"\x01\x00\x00\x00"
    assert decode_label(encode_label(2_059_905)) == 2_059_905
    with pytest.raises(ValueError):
        encode_label(-1)
    with pytest.raises(ValueError, match="4 bytes"):
        decode_label(b"\x01\x00")


def test_shards_roll_over_and_hold_samples_in_write_order(tmp_path):
    samples, shards = _write(tmp_path)
    assert [(s.name, s.num_samples) for s in shards] == [
        ("train-000000.tar", 3), ("train-000001.tar", 3), ("train-000002.tar", 1)]
    read = []
    for shard in shards:
        assert hashlib.sha256((tmp_path / shard.name).read_bytes()).hexdigest() == shard.sha256
        with tarfile.open(tmp_path / shard.name) as tar:
            members = tar.getmembers()
            assert all("." not in m.name.split(".", 1)[0] and m.mtime == 0 for m in members)
            for jpg, lbl in zip(members[::2], members[1::2], strict=True):
                assert jpg.name.endswith(".jpg") and lbl.name == jpg.name[:-3] + "lbl"
                read.append((tar.extractfile(jpg).read(), decode_label(tar.extractfile(lbl).read())))
    assert read == samples


def test_equal_input_gives_identical_bytes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for name in ("train-000000.tar", "train-000000.idx", "train-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_index_offsets_point_at_member_data(tmp_path):
    samples, shards = _write(tmp_path)
    data = (tmp_path / "train-000001.tar").read_bytes()
    lines = (tmp_path / "train-000001.idx").read_text().splitlines()
    assert lines[0] == "v1.2 3"
    for line, (jpeg, label) in zip(lines[1:], samples[3:6], strict=True):
        ext, offset, size, name, ext2, offset2, size2, name2 = line.split()
        assert (ext, ext2) == ("jpg", "lbl") and name.endswith(".jpg") and name2.endswith(".lbl")
        assert data[int(offset):int(offset) + int(size)] == jpeg
        assert decode_label(data[int(offset2):int(offset2) + int(size2)]) == label


def test_index_matches_dali_wds2idx_and_index_tar(tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool ships with nvidia-dali")
    _write(tmp_path, count=9, shard_size=4)
    for number in range(3):
        tar = tmp_path / f"train-{number:06d}.tar"
        creator = wds2idx.IndexCreator(str(tar), str(tmp_path / "dali.idx"), verbose=False)
        creator.create_index()
        creator.close()
        ours = (tmp_path / f"train-{number:06d}.idx").read_text()
        assert ours == (tmp_path / "dali.idx").read_text()
        assert index_tar(tar, tmp_path / "again.idx").read_text() == ours
    script = Path(sys.executable).with_name("wds2idx")  # the console script, as users would run it
    if script.exists():
        subprocess.run([str(script), str(tmp_path / "train-000000.tar"), str(tmp_path / "cli.idx")],
                       check=True, capture_output=True)
        assert (tmp_path / "cli.idx").read_text() == (tmp_path / "train-000000.idx").read_text()


def _manifest(tmp_path):
    _, shards = _write(tmp_path)
    return Manifest(num_classes=3, num_samples=7, image_size=112, source="test", shards=shards,
                    samples_per_identity=[2, 2, 3])


def test_manifest_round_trip_and_paths(tmp_path):
    manifest = _manifest(tmp_path)
    manifest.save(tmp_path)
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert body["format"] == MANIFEST_FORMAT and body["shards"][0]["name"] == "train-000000.tar"
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert loaded.shard_paths()[2] == (tmp_path / "train-000002.tar").resolve()
    assert loaded.index_paths()[0].name == "train-000000.idx"


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.pop("num_classes"), "missing key 'num_classes'"),
    (lambda b: b.update(format="other"), "format is 'other'"),
    (lambda b: b.update(num_samples="7"), "'num_samples' must be a int"),
    (lambda b: b.update(num_samples=8), "sum to 7 but num_samples is 8"),
    (lambda b: b["shards"][0].pop("sha256"), r"shards\[0\] needs name"),
    (lambda b: b.update(samples_per_identity=[7]), "samples_per_identity has 1 entries"),
])
def test_manifest_errors_name_file_and_fix(tmp_path, edit, message):
    _manifest(tmp_path).save(tmp_path)
    body = json.loads((tmp_path / "manifest.json").read_text())
    edit(body)
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value) and "facescale synth" in str(info.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json not found.*data.shards.*facescale synth"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_decode_jpeg_into_a_buffer_and_by_either_decoder():
    from facescale.data.jpeg import decode_jpeg

    image = render_identity(1, 0, 1, 32)[0]
    data = encode_jpeg(image, 95)
    plain = decode_jpeg(data)
    assert np.abs(plain.astype(int) - image).mean() < 8  # lossy, but the same picture
    out = np.zeros((32, 32, 3), np.uint8)
    assert decode_jpeg(data, out) is out and np.array_equal(out, plain)
    assert np.array_equal(decode_jpeg(data, decoder="pil"), plain)  # both decoders: identical pixels
    small = np.zeros((16, 16, 3), np.uint8)
    assert decode_jpeg(data, small).shape == (32, 32, 3) and not small.any()  # wrong size: left untouched
    with pytest.raises(ValueError, match="data.jpeg_decoder must be one of"):
        decode_jpeg(data, decoder="turbo")
