"""Bad data with both readers: corrupt JPEG, truncated tar, missing .lbl, label out of range, no shards.

`on_bad_sample: error` must stop naming the shard, key and reason; `skip` must leave the sample out, count
it, keep every batch full, and stop once the skip budget (`max_skip_fraction`) is exceeded."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch

from facescale.config.schema import DataConfig
from facescale.data.bad_data import BadSample, BadSampleError, check_image
from facescale.data.index_check import ShardIndexError
from facescale.data.jpeg import encode_jpeg
from facescale.data.loader import build_train_loader, dali_available
from facescale.data.manifest import Manifest, ManifestError
from facescale.data.shard_writer import ShardWriter, index_tar
from facescale.data.synth_faces import render_identity

SIZE, COUNT, CLASSES, BATCH = 16, 12, 12, 2
CPU = torch.device("cpu")
READERS = ["webdataset", "webdataset-resampled"] + (["dali"] if dali_available() else [])
CASES = {"corrupt_jpeg": ("train-000000.tar", "000000005", "JPEG does not decode"),
         # random bytes inside a valid JPEG: DALI's decoder turns it into an image without an error
         "garbled_jpeg": ("train-000000.tar", "000000005", "JPEG does not decode"),
         "label_out_of_range": ("train-000000.tar", "000000005", "label 99 outside [0, 12)"),
         "missing_lbl": ("train-000000.tar", "000000005", "missing .lbl"),
         "truncated_tar": ("train-000001.tar", "000000008", "truncated")}


def garble(jpeg: bytes) -> bytes:
    """Random bytes over the last two thirds of the entropy-coded data; headers and EOI marker kept."""
    start = len(jpeg) // 3
    noise = np.random.default_rng(5).integers(0, 256, len(jpeg) - 2 - start, dtype=np.uint8).tobytes()
    garbled = jpeg[:start] + noise + jpeg[-2:]
    assert check_image(garbled, SIZE) is not None, "the strict decoder must refuse the garbled JPEG"
    return garbled


def make_bad_dir(out, case: str):
    """12 samples (label = index) in two shards of 6, with one defect of kind `case` (or "good")."""
    images = render_identity(2, 0, COUNT, SIZE)
    with ShardWriter(out, shard_size=6) as writer:
        for label, image in enumerate(images):
            jpeg = encode_jpeg(image)
            if case == "corrupt_jpeg" and label == 5:
                jpeg = b"\xff\xd8" + bytes(range(256)) * 2
            if case == "garbled_jpeg" and label == 5:
                jpeg = garble(jpeg)
            writer.write(jpeg, 99 if case == "label_out_of_range" and label == 5 else label)
    Manifest(num_classes=CLASSES, num_samples=COUNT, image_size=SIZE, source="test", shards=writer.shards,
             samples_per_identity=[1] * CLASSES).save(out)
    if case == "missing_lbl":
        tar_path = out / "train-000000.tar"
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar if m.name != "000000005.lbl"]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
        index_tar(tar_path)
    if case == "truncated_tar":  # cut shard 1 inside the JPEG of its third sample (key 000000008)
        tar_path = out / "train-000001.tar"
        line = (out / "train-000001.idx").read_text().splitlines()[3].split()
        tar_path.write_bytes(tar_path.read_bytes()[: int(line[1]) + 10])
    return out


def _loader(directory, reader, **overrides):
    if reader == "webdataset-resampled":  # the webdataset reader drawing shards with replacement
        reader, overrides = "webdataset", {"shard_sampling": "resampled", **overrides}
    config = DataConfig(shards=str(directory), reader=reader, image_size=SIZE, num_workers=0, dali_threads=1,
                        shuffle_buffer=4, random_mirror=False, max_skip_fraction=0.5)
    return build_train_loader(dataclasses.replace(config, **overrides), rank=0, world_size=1,
                              batch_size=BATCH, seed=1, device=CPU)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_error_policy_names_shard_key_and_reason(tmp_path, reader, case):
    shard, key, reason = CASES[case]
    make_bad_dir(tmp_path, case)
    with pytest.raises(BadSampleError) as caught:  # DALI at start-up (its shard scan), webdataset on reading
        loader = _loader(tmp_path, reader, on_bad_sample="error")
        for _ in range(2):
            list(loader.iter_epoch())
    assert shard in str(caught.value) and key in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_policy_leaves_bad_samples_out_and_counts_them(tmp_path, reader, case):
    loader = _loader(make_bad_dir(tmp_path, case), reader, on_bad_sample="skip", num_workers=1)
    lost = {5} if case != "truncated_tar" else {8, 9, 10, 11}
    for _ in range(2):
        batches = list(loader.iter_epoch())
        assert len(batches) == loader.steps_per_epoch
        labels = torch.cat([labels for _, labels in batches]).tolist()
        assert len(labels) == loader.steps_per_epoch * BATCH and not set(labels) & lost
    # resampled shards meet a random subset of the bad samples (the last ones drawn may wait in the buffer)
    assert loader.skipped >= (len(lost) if reader != "webdataset-resampled" else 1)
    assert loader.seen == 2 * loader.steps_per_epoch * BATCH
    with pytest.raises(BadSampleError, match="max_skip_fraction"):  # DALI at start-up, webdataset on reading
        list(_loader(tmp_path, reader, on_bad_sample="skip", max_skip_fraction=0.01).iter_epoch())


@pytest.mark.parametrize("reader", READERS)
def test_empty_or_missing_shard_list_stops_with_the_fix(tmp_path, reader):
    make_bad_dir(tmp_path, "good")
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match="train-000001.tar is listed in manifest.json but missing"):
        _loader(tmp_path, reader)
    body = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**body, "shards": [], "num_samples": 0}))
    with pytest.raises(ManifestError, match="lists no shards"):
        _loader(tmp_path, reader)
    with pytest.raises(ManifestError, match="data.shards is empty"):
        _loader("", reader)


def _shift_offsets(index_path, by: int) -> None:
    """Move every member offset of a `.idx` by `by` bytes (what a stale or hand-edited index looks like)."""
    lines = index_path.read_text().splitlines()
    body = []
    for line in lines[1:]:
        parts = line.split()
        for i in range(1, len(parts), 4):
            parts[i] = str(int(parts[i]) + by)
        body.append(" ".join(parts))
    index_path.write_text("\n".join([lines[0], *body]) + "\n")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", ["shift+512", "shift-512", "foreign"])
def test_misaligned_or_foreign_index_is_named_before_reading(tmp_path, reader, damage):
    """A `.idx` that does not match its tar stops the run at start-up naming it (DALI crashed on these)."""
    make_bad_dir(tmp_path, "good")
    index = tmp_path / "train-000001.idx"
    if damage == "foreign":
        index.write_text((tmp_path / "train-000000.idx").read_text())
    else:
        _shift_offsets(index, 512 if damage == "shift+512" else -512)
    with pytest.raises(ShardIndexError) as caught:
        _loader(tmp_path, reader)
    message = caught.value.line()
    assert "train-000001.idx" in message and "line 2" in message and "index_tar" in message


def test_a_worker_with_no_good_sample_names_a_file_and_reason(tmp_path):
    """The stop message named the worker's part as shard numbers and positions ([(1, 0, 6), ...])."""
    loader = _loader(make_bad_dir(tmp_path, "good"), "webdataset", on_bad_sample="skip")
    for tar in tmp_path.glob("*.tar"):
        tar.unlink()
    expected = (r"no good sample in its part of epoch 0 \(12 samples in 2 shards\); the first met: "
                r"\S+/train-00000[01]\.tar: sample '\d+': the tar cannot be read \(No such file or "
                r"directory\); run `facescale validate`")
    with pytest.raises(BadSampleError, match=expected):
        list(loader.iter_epoch())


@pytest.mark.parametrize("reader", READERS)
def test_a_shard_replaced_by_a_bigger_one_after_the_manifest_is_refused(tmp_path, reader):
    """Re-made and re-indexed with 2 more samples: DALI read them and the webdataset reader did not."""
    make_bad_dir(tmp_path, "good")
    with ShardWriter(tmp_path / "new", shard_size=8, start_shard=1) as writer:
        for label, image in enumerate(render_identity(3, 0, 8, SIZE)):
            writer.write(encode_jpeg(image), label)
    for suffix in (".tar", ".idx"):
        (tmp_path / "new" / f"train-000001{suffix}").replace(tmp_path / f"train-000001{suffix}")
    with pytest.raises(ShardIndexError, match="lists 8 samples but manifest.json counts 6 in "
                                              "train-000001.tar: the shard was replaced") as caught:
        _loader(tmp_path, reader)
    assert "facescale validate" in caught.value.line()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_shard_deleted_while_training_is_a_bad_sample_naming_it(tmp_path, policy):
    """Its .idx kept: the reader opens the tar by the index's offsets (an OSError naming nothing, from a
    worker); now its samples are bad ones naming the tar, under the run's policy."""
    loader = _loader(make_bad_dir(tmp_path, "good"), "webdataset", on_bad_sample=policy)
    (tmp_path / "train-000001.tar").unlink()
    if policy == "error":
        with pytest.raises(BadSampleError, match=r"train-000001.tar: sample '\d+': the tar cannot be read"):
            list(loader.iter_epoch())
    else:
        assert len(list(loader.iter_epoch())) == loader.steps_per_epoch and loader.skipped == 6


@pytest.mark.parametrize("case", ["label_out_of_range", "missing_lbl", "truncated_tar"])
def test_identity_index_names_bad_data_as_input_errors(tmp_path, case):
    """F2C's identity index (built after the process group) reports bad shards as one-line input errors
    (ManifestError / BadSampleError), not as a rank's traceback."""
    from facescale.data.identity_index import IdentityIndex

    shard, key, reason = CASES[case]
    with pytest.raises(ManifestError) as error:
        IdentityIndex.build(make_bad_dir(tmp_path / case, case))
    assert f"{shard}: sample '{key}'" in str(error.value) and reason in str(error.value)


@pytest.mark.parametrize("case", ["corrupt_jpeg", "garbled_jpeg"])
def test_f2c_identity_loader_names_a_bad_jpeg_in_one_line(tmp_path, case):
    """It was simplejpeg's ValueError: an 88-line traceback from the trainer."""
    from facescale.data.identity_index import IdentityIndex
    from facescale.f2c.identity_loader import IdentityPairs

    pairs = IdentityPairs(IdentityIndex.build(make_bad_dir(tmp_path, case)), rank=0, world_size=1,
                          identities_per_batch=CLASSES, seed=0, mirror=False, image_size=SIZE)
    with pytest.raises(BadSampleError) as caught:
        pairs.make_batch(0, 0)
    assert re.fullmatch(r"bad training sample: .*train-000000\.tar at byte \d+: JPEG does not decode.*; "
                        r"repair or drop it \(`facescale validate DIR` lists all of them\), .*",
                        caught.value.line())


@pytest.mark.parametrize("case", ["corrupt_jpeg", "label_out_of_range", "missing_lbl", "truncated_tar"])
def test_f2c_under_skip_leaves_the_bad_samples_out_of_the_identity_index(tmp_path, case):
    """A bad label or missing .lbl stopped F2C at start-up, and a corrupt JPEG in its identity batches,
    under on_bad_sample=skip too; the index now leaves out the samples the start-up scan finds bad."""
    from facescale.data.identity_index import IdentityIndex
    from facescale.data.shard_scan import scan_shards
    from facescale.f2c.identity_loader import IdentityPairs

    directory = make_bad_dir(tmp_path, case)
    index = IdentityIndex.build(directory, leave_out=scan_shards(Manifest.load(directory)))
    lost = {5} if case != "truncated_tar" else {8, 9, 10, 11}
    assert [label for label in range(CLASSES) if index.count(label) != 1] == sorted(lost)
    good = CLASSES - len(lost)
    pairs = IdentityPairs(index, rank=0, world_size=1, identities_per_batch=good, seed=0, mirror=False,
                          image_size=SIZE, on_bad_sample="skip")
    assert sorted(pairs.make_batch(0, 0)[2].tolist()) == sorted(set(range(CLASSES)) - lost)


def test_f2c_dual_loader_reports_the_instance_loaders_counts():
    """The trainer logs data/skipped_samples from its loader's `seen` and `skipped` (F2C logged none)."""
    from types import SimpleNamespace

    from facescale.f2c.dual_loader import DualLoader

    dual = DualLoader(SimpleNamespace(seen=40, skipped=3), None, CPU)
    assert (dual.seen, dual.skipped) == (40, 3)


def test_identity_index_reads_past_a_shard_cut_after_indexing(tmp_path):
    from facescale.data.identity_index import IdentityIndex

    directory = make_bad_dir(tmp_path / "good", "good")
    index = IdentityIndex.build(directory)
    tar = directory / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2048])  # cut after the index was built (e.g. a copy still running)
    with pytest.raises(BadSampleError, match="train-000001.tar: .* run past the end of the file"):
        for label in range(CLASSES):
            for location in index.locations(label):
                index.read_jpeg(location)


_CUT_WHILE_READING = """
import sys, torch
from pathlib import Path
from tests.test_bad_data import _loader
from facescale.data.bad_data import BadSampleError

directory = Path(sys.argv[1])
loader = _loader(directory, "dali", on_bad_sample=sys.argv[2], max_skip_fraction=0.5)
epochs = loader.iter_epoch()
next(iter(epochs))  # the pipeline is running and has the shards open
tar = directory / "train-000001.tar"
tar.write_bytes(tar.read_bytes()[:2048])  # cut in place, as a rewrite or a failing mount would
try:
    for _ in range(3):
        list(loader.iter_epoch())
except BadSampleError as error:
    print("BadSampleError:", error)
"""


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_dali_reader_names_a_shard_cut_while_it_reads(tmp_path, policy):
    """DALI read the shards through mmap, so a shard cut under a running job killed the process with SIGBUS
    ("Bus error", no message, nothing saved since the last checkpoint); with plain reads it is an error
    naming the sample, under skip too (it was DALI's traceback), and skip's fix is to run again."""
    import subprocess
    import sys
    from pathlib import Path

    directory = make_bad_dir(tmp_path, "good")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _CUT_WHILE_READING, str(directory), policy], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "BadSampleError: bad training sample: train-000001.tar" in proc.stdout
    assert "truncated" in proc.stdout
    assert ("run the same command again" in proc.stdout) == (policy == "skip")


def _header_says(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) is rewritten to claim width x height pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_claiming_more_pixels_than_pillows_limit_is_refused_undecoded():
    from facescale.data.convert import training_jpeg
    from facescale.data.jpeg import decode_jpeg
    from facescale.eval.decode import decode_image

    bomb = _header_says(10_000, 10_000)  # 1e8 pixels: over Pillow's 89478485, under its own 2x refusal
    refusal = "its header says 10000x10000 pixels, more than Pillow's Image.MAX_IMAGE_PIXELS"
    for decoder in ("auto", "pil"):
        with pytest.raises(ValueError, match=refusal):
            decode_jpeg(bomb, decoder=decoder)
    assert refusal in check_image(bomb, 16)
    with pytest.raises(ValueError, match=f"lfw.bin: image 3 could not be decoded \\({refusal}"):
        decode_image(bomb, 16, "lfw.bin", 3)
    with pytest.raises(ValueError, match=f"does not decode as an image \\({refusal}"):
        training_jpeg(bomb, 16, 90)


@pytest.mark.parametrize("size", [1 << 62, 1 << 70], ids=["beyond-memory", "beyond-int64"])
def test_an_index_size_beyond_the_tar_reads_at_most_the_tar(tmp_path, size):
    from facescale.data.tar_samples import read_segment

    make_bad_dir(tmp_path, "good")
    index = tmp_path / "train-000000.idx"
    lines = index.read_text().splitlines()
    jpg = lines[6].split()  # the last sample (a read ends there): `jpg offset size name lbl offset size name`
    lines[6] = " ".join([*jpg[:2], str(size), *jpg[3:]])
    index.write_text("\n".join(lines) + "\n")
    read = list(read_segment(str(tmp_path / "train-000000.tar"), 0, 6))
    assert [item.key if isinstance(item, BadSample) else item["__key__"] for item in read] == [
        f"00000000{i}" for i in range(6)]
    assert isinstance(read[5], BadSample) and "past the end of the tar" in read[5].reason


@pytest.mark.parametrize("value", ["4²", "-5"])
def test_index_numbers_that_are_not_plain_digits_name_the_line(tmp_path, value):
    from facescale.data.bad_data import read_index_lines

    make_bad_dir(tmp_path, "good")
    index = tmp_path / "train-000000.idx"
    lines = index.read_text().splitlines()
    lines[2] = " ".join([lines[2].split()[0], value, *lines[2].split()[2:]])
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train-000000.idx:3: offsets and sizes must be non-negative"):
        list(read_index_lines(index))


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_skip_with_same_named_shards_in_subfolders(tmp_path):
    """a/train-000000.tar (6 samples) and b/train-000000.tar (8, one bad): the bad samples and the filtered
    .idx copies are kept apart by shard (they shared one scratch .idx: "pipeline no longer valid")."""
    make_bad_dir(tmp_path / "a", "good")
    with ShardWriter(tmp_path / "b", shard_size=8) as writer:
        for label, image in enumerate(render_identity(3, 0, 8, SIZE)):
            writer.write(encode_jpeg(image), 99 if label == 3 else label)
    shards = [dataclasses.replace(info, name=f"{part}/{info.name}")
              for part, infos in (("a", Manifest.load(tmp_path / "a").shards), ("b", writer.shards))
              for info in infos]
    Manifest(num_classes=CLASSES, num_samples=COUNT + 8, image_size=SIZE, source="test", shards=shards,
             samples_per_identity=[]).save(tmp_path)
    loader = _loader(tmp_path, "dali", on_bad_sample="skip")
    assert loader.steps_per_epoch == (COUNT + 7) // BATCH and loader.skipped == 1
    labels = torch.cat([labels for _, labels in loader.iter_epoch()]).tolist()
    assert len(labels) == loader.steps_per_epoch * BATCH and labels.count(3) <= 1


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_skip_leaves_out_a_shard_with_no_good_sample(tmp_path):
    """Its filtered .idx would list no sample, which DALI refuses ("sample count must be positive")."""
    make_bad_dir(tmp_path, "good")
    tar = tmp_path / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:600])  # inside its first JPEG: all 6 samples lost
    loader = _loader(tmp_path, "dali", on_bad_sample="skip")
    labels = torch.cat([labels for _, labels in loader.iter_epoch()]).tolist()
    assert len(labels) == COUNT // 2 and set(labels) <= set(range(6)) and loader.skipped == 6


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_skip_counts_each_bad_sample_once_over_the_ranks(tmp_path):
    """Every rank held the whole set's count, and the trainer sums data/skipped_samples over the ranks."""
    directory = make_bad_dir(tmp_path, "truncated_tar")  # 4 bad samples
    counts = []
    for rank in range(3):
        config = DataConfig(shards=str(directory), reader="dali", image_size=SIZE, dali_threads=1,
                            on_bad_sample="skip", max_skip_fraction=0.5)
        counts.append(build_train_loader(config, rank=rank, world_size=3, batch_size=1, seed=1,
                                         device=CPU).skipped)
    assert sum(counts) == 4
