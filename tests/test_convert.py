"""Converters: insightface RecordIO (written here by the published format) and image folders -> shards."""

from __future__ import annotations

import json
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from facescale.cli import main
from facescale.data.convert import STATE_DIR, convert, folder_source, rec_source
from facescale.data.jpeg import decode_jpeg, encode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.recordio import RECORD_MAGIC, RecordFile, RecordIOError
from facescale.data.shard_writer import decode_label

SIZE = 32
MAGIC = struct.pack("<I", RECORD_MAGIC)


def _record(payload: bytes) -> bytes:
    """RecordIO framing: split the payload at 4-byte-aligned magic words (cflag 1/2/3), pad parts to 4 B."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC]
    parts, start = [], 0
    for cut in cuts:
        parts.append(payload[start:cut])
        start = cut + 4
    parts.append(payload[start:])
    out = b""
    for number, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if number == 0 else 3 if number == len(parts) - 1 else 2
        out += struct.pack("<II", RECORD_MAGIC, cflag << 29 | len(part)) + part + b"\0" * (-len(part) % 4)
    return out


def _pack(labels, image: bytes, record_id: int = 0) -> bytes:
    """IRHeader 'IfQQ' (+ `flag` float labels when there are several) followed by the image bytes."""
    if isinstance(labels, (int, float)):
        return struct.pack("<IfQQ", 0, float(labels), record_id, 0) + image
    header = struct.pack("<IfQQ", len(labels), 0.0, record_id, 0)
    return header + struct.pack(f"<{len(labels)}f", *labels) + image


def _with_magic_comment(jpeg: bytes) -> bytes:
    """A JPEG whose COM segment holds the RecordIO magic at payload offset 32 (so the record is split)."""
    comment = b"\0\0" + MAGIC + b"facescale"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def _images(count, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return [encode_jpeg((rng.random((size, size, 3)) * 255).astype(np.uint8), 95) for _ in range(count)]


def write_insightface_rec(tmp_path, per_identity=(3, 2, 4)):
    """An insightface-style set: header record 0, image records 1..n, identity records; returns truth."""
    images = _images(sum(per_identity))
    images[1] = _with_magic_comment(images[1])
    truth, records, key = [], {}, 1
    for label, count in enumerate(per_identity):
        for _ in range(count):
            image = images[key - 1]
            labels = [float(label), 7.0] if key == 4 else label  # one multi-label header
            records[key] = _pack(labels, image, key)
            truth.append((label, image))
            key += 1
    first_identity = key
    start = 1
    for count in per_identity:
        records[key] = _pack([float(start), float(start + count)], b"", key)
        start, key = start + count, key + 1
    records[0] = _pack([float(first_identity), float(key)], b"")
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    lines, blob = [], b""
    for record_key in sorted(records):
        lines.append(f"{record_key}\t{len(blob)}\n")
        blob += _record(records[record_key])
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    return rec, idx, truth


def _read_shards(directory):
    samples = []
    for tar_path in Manifest.load(directory).shard_paths():
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        for name in sorted(members):
            if name.endswith(".jpg"):
                samples.append((decode_label(members[name[:-4] + ".lbl"]), members[name]))
    return samples


def test_recordio_reader_parses_header_split_and_multilabel_records(tmp_path):
    rec, idx, truth = write_insightface_rec(tmp_path)
    records = RecordFile(rec, idx)
    assert records.image_keys() == list(range(1, 10)) and records.identity_count() == 3
    assert records.read(2).image == truth[1][1]  # split at the magic word and joined back
    assert records.read(4).labels == (1.0, 7.0) and records.read(4).class_label == 1
    assert records.read(11).labels == (4.0, 6.0)  # identity record 2: images 4..5
    (tmp_path / "bad.idx").write_text("0\t5\n")
    with pytest.raises(RecordIOError, match="no RecordIO magic at offset 5"):
        RecordFile(rec, tmp_path / "bad.idx").read(0)


def test_convert_rec_round_trips_labels_and_pixels(tmp_path):
    rec, idx, truth = write_insightface_rec(tmp_path)
    summary = convert(rec_source(rec, idx), tmp_path / "out", shard_size=4, workers=1, image_size=SIZE,
                      progress=False)
    manifest = Manifest.load(tmp_path / "out")
    assert (manifest.num_classes, manifest.num_samples, manifest.samples_per_identity) == (3, 9, [3, 2, 4])
    assert [s.num_samples for s in manifest.shards] == [4, 4, 1] and summary.bad == []
    assert manifest.source.startswith("rec:")
    read = _read_shards(tmp_path / "out")
    assert sorted(read) == sorted(truth)  # the JPEG bytes are kept, so pixels are identical
    assert [label for label, _ in read] != [label for label, _ in truth]  # globally shuffled
    for label, jpeg in read:
        assert decode_jpeg(jpeg).shape == (SIZE, SIZE, 3) and 0 <= label < 3


def test_convert_resumes_only_unfinished_shards(tmp_path):
    rec, idx, _ = write_insightface_rec(tmp_path)
    out = tmp_path / "out"
    convert(rec_source(rec, idx), out, shard_size=2, workers=1, image_size=SIZE, progress=False)
    first = json.loads((out / "manifest.json").read_text())
    for path in (out / STATE_DIR / "shard-000001.json", out / "train-000001.tar", out / "manifest.json",
                 out / STATE_DIR / "shard-000003.json"):
        path.unlink()  # as if killed while writing shards 1 and 3
    summary = convert(rec_source(rec, idx), out, shard_size=2, workers=2, image_size=SIZE, progress=False)
    assert (summary.converted_shards, summary.resumed_shards) == (2, 3)
    assert json.loads((out / "manifest.json").read_text()) == first
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(rec_source(rec, idx), out, shard_size=3, workers=1, image_size=SIZE, progress=False)


def test_convert_folder_labels_by_sorted_directory_and_resizes(tmp_path):
    root = tmp_path / "faces"
    expected = {}
    for label, name in enumerate(["alice", "bob", "carol"]):
        (root / name).mkdir(parents=True)
        for number, jpeg in enumerate(_images(2, seed=label)):
            (root / name / f"{number}.jpg").write_bytes(jpeg)
            expected.setdefault(label, []).append(jpeg)
    big = Image.fromarray(np.full((48, 40, 3), 200, np.uint8))
    big.save(root / "bob" / "big.png")
    (root / "carol" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code = main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--shard-size", "3", "--workers", "1", "--image-size", str(SIZE), "--quiet"])
    assert code == 0
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.samples_per_identity == [2, 3, 2]
    read = _read_shards(tmp_path / "out")
    for label, jpeg in read:
        pixels = decode_jpeg(jpeg)
        assert pixels.shape == (SIZE, SIZE, 3)
        assert jpeg in expected[label] or (label == 1 and abs(int(pixels.mean()) - 200) <= 2)
    state = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / STATE_DIR).glob("shard-*.json"))]
    assert sum(s["reencoded"] for s in state) == 1
    assert [b for s in state for b in s["bad"]] == [
        "carol/broken.jpg (identity 2): does not decode as an image (no image format recognised)"]


def test_folder_source_rejects_empty_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="one directory per identity"):
        folder_source(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        folder_source(tmp_path / "empty")


def _nested_faces(root, levels: int):
    """Identities `levels` directories down (e.g. 3: root/<a>/<b>/<identity>/*.jpg); returns
    {relative identity path: [jpeg bytes]} in the sorted order that defines the labels."""
    truth = {}
    images = iter(_images(40, seed=9))
    for top in ("0", "1"):
        for middle in (["x", "y"] if levels == 3 else [""]):
            for name in ("m.0b", "m.0a"):
                rel = "/".join(part for part in (top, middle, name) if part)
                (root / rel).mkdir(parents=True)
                truth[rel] = []
                for number in range(1 + len(truth) % 3):
                    jpeg = next(images)
                    (root / rel / f"{number}.jpg").write_bytes(jpeg)
                    truth[rel].append(jpeg)
    return dict(sorted(truth.items()))


@pytest.mark.parametrize("depth", ["3", "auto"])
def test_convert_folder_reads_a_nested_layout(tmp_path, capsys, depth):
    root = tmp_path / "faces"
    truth = _nested_faces(root, levels=3)
    code = main(["convert", "folder", "--root", str(root), "--depth", depth, "--out", str(tmp_path / "out"),
                 "--shard-size", "5", "--workers", "1", "--image-size", str(SIZE)])
    assert code == 0
    assert "list level 3/3" in capsys.readouterr().err  # the listing shows progress per level
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.num_classes == 8 and manifest.samples_per_identity == [len(v) for v in truth.values()]
    labels = {jpeg: label for label, images in enumerate(truth.values()) for jpeg in images}
    read = _read_shards(tmp_path / "out")
    assert len(read) == sum(len(v) for v in truth.values())
    assert all(labels[jpeg] == label for label, jpeg in read)
    assert list(truth)[:2] == ["0/x/m.0a", "0/x/m.0b"]  # identity = relative path, sorted


def test_nested_layout_errors_name_the_directory_and_the_depth(tmp_path):
    root = tmp_path / "faces"
    _nested_faces(root, levels=2)
    (root / "1" / "stray.jpg").write_bytes(_images(1)[0])
    with pytest.raises(ValueError, match=r"faces/1: holds images 1 level\(s\) below the root.*--depth 1"):
        folder_source(root, depth=2)
    with pytest.raises(SystemExit):  # argparse: "'0' is not 'auto' or a level count >= 1"
        main(["convert", "folder", "--root", str(root), "--depth", "0", "--out", str(tmp_path / "o")])


def test_convert_rec_copies_the_verification_sets_beside_it(tmp_path, capsys):
    from facescale.eval.binfile import read_bin, write_bin

    rec, _, _ = write_insightface_rec(tmp_path)
    pair = _images(2)
    write_bin(tmp_path / "lfw.bin", pair, [True])
    write_bin(tmp_path / "cfp_fp.bin", pair + pair, [True, False])
    (tmp_path / "broken.bin").write_bytes(b"not a pickle")
    out = tmp_path / "out"
    assert main(["convert", "rec", "--rec", str(rec), "--out", str(out), "--workers", "1",
                 "--image-size", str(SIZE), "--quiet"]) == 0  # --idx defaults to train.idx beside it
    printed = capsys.readouterr().out
    assert "copied lfw.bin (1 pairs)" in printed and "not copied broken.bin" in printed
    assert read_bin(out / "cfp_fp.bin").issame == [True, False] and not (out / "broken.bin").exists()
