"""Converters: insightface RecordIO (written here by the published format) and image folders -> shards."""

from __future__ import annotations

import json
import pickle
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
    rec, idx = _write_pair(tmp_path, records)
    return rec, idx, truth


def _write_pair(directory, records: dict[int, bytes]):
    """train.rec with the payloads in key order and its train.idx ('key<TAB>offset' lines)."""
    rec, idx = directory / "train.rec", directory / "train.idx"
    lines, blob = [], b""
    for record_key in sorted(records):
        lines.append(f"{record_key}\t{len(blob)}\n")
        blob += _record(records[record_key])
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    return rec, idx


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
    with pytest.raises(ValueError, match=r"faces/1: holds images 1 level\(s\) below the root.*move them "
                                         r"into an identity's directory 2 level\(s\) below the root"):
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


def _convert_rec(rec, out, *extra) -> int:
    return main(["convert", "rec", "--rec", str(rec), "--out", str(out), "--workers", "1", "--image-size",
                 str(SIZE), "--quiet", *extra])


@pytest.mark.parametrize("damage", ["truncated", "foreign-idx"])
def test_a_damaged_rec_stops_the_conversion_instead_of_dropping_its_images(tmp_path, capsys, damage):
    rec, idx, truth = write_insightface_rec(tmp_path, per_identity=(4, 4, 4))
    whole = rec.read_bytes()
    if damage == "truncated":
        rec.write_bytes(whole[: len(whole) * 6 // 10])
    else:  # offsets that do not point at records of this file
        idx.write_text("".join(f"{k}\t{int(o) + 4 * (int(k) % 2)}\n" for k, o in
                               (line.split() for line in idx.read_text().splitlines())))
    assert _convert_rec(rec, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.rec" in err[0]
    assert ("runs past the end of the file" in err[0] or "is truncated" in err[0]) if damage == "truncated" \
        else "the .idx does not belong to this .rec" in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()
    write_insightface_rec(tmp_path, per_identity=(4, 4, 4))  # the right pair again: every image
    assert _convert_rec(rec, tmp_path / "out", "--overwrite") == 0  # (the source changed: a new plan)
    assert sorted(label for label, _ in _read_shards(tmp_path / "out")) == sorted(t[0] for t in truth)


def test_a_rec_without_its_idx_says_which_file_is_needed(tmp_path, capsys):
    rec, idx, _ = write_insightface_rec(tmp_path)
    idx.unlink()
    assert _convert_rec(rec, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "train.idx not found" in err and "pass --idx" in err and "Traceback" not in err


def test_labels_that_are_not_class_numbers_are_left_out_and_empty_identities_are_reported(tmp_path, capsys):
    images = _images(5)
    records = {k: _pack(label, images[k - 1], k) for k, label in enumerate([0, 1, 2.5, 2.0**31, 9], start=1)}
    records[6], records[7], records[8] = (_pack([1.0, 2.0], b"", 6), _pack([2.0, 4.0], b"", 7),
                                          _pack([4.0, 6.0], b"", 8))
    records[0] = _pack([6.0, 9.0], b"")  # three identities announced; one record says class 9
    rec, _ = _write_pair(tmp_path, records)
    assert _convert_rec(rec, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "record 3: label 2.5 is not a class number" in printed
    assert "record 4: label 2.14748e+09 is not a class number" in printed
    assert sorted(label for label, _ in _read_shards(tmp_path / "out")) == [0, 1, 9]
    assert Manifest.load(tmp_path / "out").num_classes == 10
    assert ("identities without an image: 7 (labels 2, 3, 4, 5, 6, 7, 8; the .rec header announces 3 "
            "identities)") in printed


def test_a_rec_whose_images_all_fail_is_one_line(tmp_path, capsys):
    records = {1: _pack(0, b"not an image", 1), 2: _pack([1.0, 2.0], b"", 2), 0: _pack([2.0, 3.0], b"")}
    rec, _ = _write_pair(tmp_path, records)
    assert _convert_rec(rec, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "train.rec: none of its 1 images could be converted (the first left out: record 1: does not " \
           "decode as an image" in err and "\n" not in err
    _write_pair(tmp_path, {0: records[0], 2: records[2]})  # the header and identity records only
    assert _convert_rec(rec, tmp_path / "out2") == 2
    assert "train.rec: its .idx lists no image record" in capsys.readouterr().err


def test_header_record_numbers_above_float32s_exact_range_find_the_true_boundary(tmp_path):
    """Glint360K (17.1M images) and a 42M-image rec store record numbers above 2**24 in float32 labels,
    which round them; the images up to the true first identity record must all be converted."""
    first_identity, end = 2**24 + 5, 2**24 + 7  # odd: float32 cannot hold them
    rounded = [struct.unpack("<f", struct.pack("<f", v))[0] for v in (first_identity, end)]
    assert rounded != [first_identity, end]
    images = _images(5)
    labels = [0, 0, 1, 1, 1]
    records = {key: _pack(label, image, key) for key, label, image in
               zip(range(first_identity - 5, first_identity), labels, images, strict=True)}
    records[first_identity] = _pack([float(first_identity - 5), float(first_identity - 3)], b"")
    records[first_identity + 1] = _pack([float(first_identity - 3), float(first_identity)], b"")
    records[0] = _pack(rounded, b"")  # only the listed keys are read: a sparse .idx stands for the rest
    rec, idx = _write_pair(tmp_path, records)
    assert RecordFile(rec, idx).identity_count() == 2
    convert(rec_source(rec, idx), tmp_path / "out", workers=1, image_size=SIZE, progress=False)
    read = _read_shards(tmp_path / "out")
    assert sorted(read, key=lambda s: images.index(s[1])) == list(zip(labels, images, strict=True))
    assert Manifest.load(tmp_path / "out").num_classes == 2


def test_folder_sets_read_as_torchvisions_imagefolder_reads_them(tmp_path, capsys):
    """Images in an identity's sub-directories are that identity's (ImageFolder walks each class directory),
    hidden folders are not identities, ImageFolder's suffixes (.tif) are read, a 16-bit PNG is scaled as
    OpenCV scales it (>> 8) instead of clipped to white, and names that are not UTF-8 convert."""
    import os

    root = tmp_path / "faces"
    jpegs = _images(4)
    for rel, data in (("a/0.jpg", jpegs[0]), ("a/aligned/1.jpg", jpegs[1]), ("b/2.jpg", jpegs[2]),
                      ("c/3.jpg", jpegs[3]), (".ipynb_checkpoints/x.jpg", jpegs[0]), ("b/._2.jpg", b"\0")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    Image.fromarray(np.full((SIZE, SIZE), 0x8000, np.uint16)).save(root / "b" / "grey16.png")
    Image.fromarray(np.full((SIZE, SIZE, 3), 40, np.uint8)).save(root / "c" / "flat.tif")
    os.mkdir(os.fsencode(root) + b"/d\xe9")  # Latin-1 name from an old archive
    (root / "d\udce9" / "caf\udce9.jpg").write_bytes(jpegs[3])
    assert main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--image-size", str(SIZE), "--quiet"]) == 0
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.num_classes == 4 and manifest.samples_per_identity == [2, 2, 2, 1]
    read = _read_shards(tmp_path / "out")
    means = {label: [] for label in range(4)}
    for label, jpeg in read:
        means[label].append(round(float(decode_jpeg(jpeg).mean())))
    assert 128 in means[1] and 40 in means[2]  # 0x8000 >> 8; the TIFF's grey
    from facescale.eval.decode import decode_image  # `facescale embed` and eval read such files alike

    assert decode_image((root / "b" / "grey16.png").read_bytes(), SIZE, "grey16.png").mean() == 128


def test_an_output_inside_the_root_is_not_an_identity_and_a_rerun_plans_the_same(tmp_path, capsys):
    root = tmp_path / "casia"
    truth = _nested_faces(root, levels=2)
    (root / "1" / "m.0c").mkdir()  # an identity folder without images is still a class
    args = ["convert", "folder", "--root", str(root), "--depth", "2", "--out", str(root / "shards"),
            "--shard-size", "4", "--workers", "1", "--image-size", str(SIZE), "--quiet"]
    assert main(args) == 0
    first = Manifest.load(root / "shards")
    assert first.num_classes == len(truth) + 1
    assert "identities without an image: 1" in capsys.readouterr().out
    assert main(args) == 0  # the same command again: resumes, nothing changes
    assert Manifest.load(root / "shards") == first


def test_auto_depth_passes_empty_and_hidden_first_folders(tmp_path):
    root = tmp_path / "faces"
    (root / ".cache" / "deep").mkdir(parents=True)
    (root / "0" / "aaa_empty").mkdir(parents=True)
    (root / "0" / "m.1").mkdir()
    (root / "0" / "m.1" / "0.jpg").write_bytes(_images(1)[0])
    source = folder_source(root)
    assert [ref[0] for ref in source.refs] == ["0/m.1/0.jpg"] and source.num_classes_hint == 2


def test_an_unreadable_image_file_stops_the_conversion_naming_it(tmp_path, capsys):
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg").write_bytes(_images(1)[0])
    (root / "a" / "1.jpg").symlink_to(tmp_path / "gone.jpg")  # listed, then cannot be read
    assert main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--image-size", str(SIZE), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "faces/a/1.jpg: cannot read it (No such file or directory); make it readable or remove it" in err


@pytest.mark.parametrize("option", [("--quality", "150"), ("--shard-size", "0"), ("--image-size", "8"),
                                    ("--workers", "0")])
def test_out_of_range_options_are_refused_before_any_work(tmp_path, capsys, option):
    rec, _, _ = write_insightface_rec(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["convert", "rec", "--rec", str(rec), "--out", str(tmp_path / "out"), *option])
    assert stop.value.code == 2 and f"'{option[1]}' is not an integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verification_sets_of_the_wrong_shape_are_not_copied(tmp_path):
    from facescale.data.eval_sets import copy_verification_sets

    (tmp_path / "flags_int.bin").write_bytes(pickle.dumps(([b"a", b"b"], 5)))
    (tmp_path / "huge.bin").write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"ab")
    lines = copy_verification_sets(tmp_path, tmp_path / "out")
    assert lines[0].startswith("not copied flags_int.bin:") and "issame is a int" in lines[0]
    assert lines[1].startswith("not copied huge.bin:") and "too large" in lines[1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("line", "message"), [
    (b"1\t99999999999999999999", r"train.idx:2: offset 99999999999999999999 of key 1 is past the end of \S+"
                                 r"train.rec \(\d+ B\)"),
    (b"1\t\xff\xfe", r"train.idx:2: expected 'key<TAB>offset'"),
    ("1\t4²".encode(), r"train.idx:2: expected 'key<TAB>offset', got '1\\t4²'"),
    (b"1\t-5", r"train.idx:2: expected 'key<TAB>offset'"),
], ids=["past-the-rec", "not-utf8", "superscript-digit", "negative"])
def test_a_damaged_idx_line_is_named(tmp_path, line, message):
    rec, idx, _ = write_insightface_rec(tmp_path)
    lines = idx.read_bytes().splitlines()
    idx.write_bytes(b"\n".join([lines[0], line, *lines[2:]]) + b"\n")
    with pytest.raises(RecordIOError, match=message):
        RecordFile(rec, idx)
