"""Both training readers: same pixels and labels, equal batch counts per rank, epochs, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from facescale.config.schema import DataConfig
from facescale.data.jpeg import encode_jpeg
from facescale.data.loader import build_train_loader, resolve_reader, steps_per_epoch
from facescale.data.manifest import Manifest, ManifestError
from facescale.data.shard_writer import ShardWriter
from facescale.data.synth_faces import render_identity
from facescale.data.tar_samples import worker_share
from tests.distributed import run_ranks

SIZE, COUNT, BATCH = 32, 25, 4  # 25 samples over uneven shards of 7: DALI's per-rank parts differ by one
CPU = torch.device("cpu")
needs_dali = pytest.mark.dali


def _dali():
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """25 samples whose label is their index, so any reader's output can be matched to the source image."""
    out = tmp_path_factory.mktemp("unique")
    images = render_identity(3, 0, COUNT, SIZE)
    with ShardWriter(out, shard_size=7) as writer:
        for label, image in enumerate(images):
            writer.write(encode_jpeg(image), label)
    Manifest(num_classes=COUNT, num_samples=COUNT, image_size=SIZE, source="test", shards=writer.shards,
             samples_per_identity=[1] * COUNT).save(out)
    return out


def _config(shard_dir, reader, **overrides):
    base = DataConfig(shards=str(shard_dir), reader=reader, image_size=SIZE, num_workers=0, dali_threads=1,
                      shuffle_buffer=8, random_mirror=False)
    return dataclasses.replace(base, **overrides)


def _reference(shard_dir):
    """Expected tensors per label, straight from the tar bytes: decode, (x - 127.5) / 127.5, CHW."""
    import webdataset as wds

    from facescale.data.jpeg import decode_jpeg
    from facescale.data.shard_writer import decode_label

    urls = [str(p) for p in Manifest.load(shard_dir).shard_paths()]
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None):
        pixels = torch.from_numpy(decode_jpeg(sample["jpg"]).astype(np.float32)).permute(2, 0, 1)
        out[decode_label(sample["lbl"])] = (pixels - 127.5) / 127.5
    return out


def _epoch(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader.iter_epoch()]


@pytest.mark.parametrize("reader,overrides", [
    pytest.param("dali", {}, marks=needs_dali), ("webdataset", {}),
    ("webdataset", {"num_workers": 2, "jpeg_decoder": "pil"}),  # shared-memory batches from workers, PIL
    ("webdataset", {"num_workers": 1, "jpeg_decoder": "simplejpeg"}),
    ("webdataset", {"num_workers": 2, "shard_sampling": "resampled"})])
def test_reader_matches_reference_pixels_and_labels(shard_dir, reader, overrides):
    if reader == "dali":
        _dali()
    loader = build_train_loader(_config(shard_dir, reader, **overrides), rank=0, world_size=1,
                                batch_size=BATCH, seed=1, device=CPU)
    batches = _epoch(loader)
    assert loader.steps_per_epoch == COUNT // BATCH == len(batches)
    reference = _reference(shard_dir)
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.shape == (BATCH, 3, SIZE, SIZE)
        assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
        assert images.is_contiguous()
        for image, label in zip(images, labels.tolist(), strict=True):
            assert torch.equal(image, reference[label])  # one normalisation, (x - 127.5) / 127.5, exactly


@pytest.mark.parametrize("reader", [pytest.param("dali", marks=needs_dali), "webdataset"])
def test_random_mirror_flips_some_images_horizontally(shard_dir, reader):
    if reader == "dali":
        _dali()
    loader = build_train_loader(_config(shard_dir, reader, random_mirror=True), rank=0, world_size=1,
                                batch_size=BATCH, seed=2, device=CPU)
    reference = _reference(shard_dir)
    flipped = []
    for images, labels in _epoch(loader):
        for image, label in zip(images, labels.tolist(), strict=True):
            plain = torch.allclose(image, reference[label], atol=1e-6)
            mirrored = torch.allclose(image, reference[label].flip(-1), atol=1e-6)
            assert plain or mirrored
            flipped.append(mirrored)
    assert 0 < sum(flipped) < len(flipped)


def _count_batches(rank, world, shard_dir, readers):
    """Per reader: batches seen in each of two epochs and the labels of the first epoch, on this rank."""
    report = {}
    for reader in readers:
        loader = build_train_loader(_config(shard_dir, reader), rank=rank, world_size=world, batch_size=BATCH,
                                    seed=7, device=CPU)
        per_epoch, labels = [0, 0], []
        for _, batch_labels in loader:  # `epoch` is the epoch of the batch just yielded
            if loader.epoch == 2:
                break
            per_epoch[loader.epoch] += 1
            labels += batch_labels.tolist() if loader.epoch == 0 else []
        report[reader] = (loader.steps_per_epoch, per_epoch, labels)
    return report


def test_two_ranks_get_equal_full_batches(shard_dir):
    from facescale.data.loader import dali_available

    readers = ["webdataset"] + (["dali"] if dali_available() else [])
    reports = run_ranks(_count_batches, 2, str(shard_dir), readers)
    expected = COUNT // (2 * BATCH)  # 3: rank parts of 12 and 13 samples, DALI pads and drops the rest
    for reader in readers:
        for steps, per_epoch, labels in (report[reader] for report in reports):
            assert steps == expected and per_epoch == [expected, expected]
            assert len(labels) == expected * BATCH
    if "dali" in readers:  # DALI splits the samples: ranks see disjoint parts within an epoch
        first, second = (set(report["dali"][2]) for report in reports)
        assert not first & second


def test_webdataset_workers_split_each_epoch_exactly(shard_dir):
    config = _config(shard_dir, "webdataset", num_workers=2)
    loader = build_train_loader(config, rank=0, world_size=1, batch_size=2, seed=3, device=CPU)
    assert loader.steps_per_epoch == 12
    assert [len(_epoch(loader)) for _ in range(2)] == [12, 12]
    assert [worker_share(12, 5, w) for w in range(5)] == [3, 3, 2, 2, 2]


def test_webdataset_stream_is_deterministic_per_seed(shard_dir):
    def first_labels(seed):
        loader = build_train_loader(_config(shard_dir, "webdataset"), rank=0, world_size=1, batch_size=BATCH,
                                    seed=seed, device=CPU)
        return torch.cat([labels for _, labels in _epoch(loader)]).tolist()

    assert first_labels(5) == first_labels(5)
    assert first_labels(5) != first_labels(6)


def test_reader_choice_and_configuration_errors(shard_dir, tmp_path):
    from facescale.data.loader import dali_available

    assert resolve_reader("webdataset") == "webdataset"
    assert resolve_reader("auto") == ("dali" if dali_available() else "webdataset")
    with pytest.raises(ValueError, match="data.reader must be one of"):
        resolve_reader("lmdb")
    with pytest.raises(ManifestError, match="data.shards is empty"):
        build_train_loader(DataConfig(), rank=0, world_size=1, batch_size=2, seed=0, device=CPU)
    with pytest.raises(ValueError, match="data.image_size is 112"):
        build_train_loader(_config(shard_dir, "webdataset", image_size=112), rank=0, world_size=1,
                           batch_size=2, seed=0, device=CPU)
    with pytest.raises(ValueError, match="fewer than one batch"):
        steps_per_epoch(25, 4, 8)
    copy = tmp_path / "noidx"
    copy.mkdir()
    for path in shard_dir.iterdir():
        if path.suffix != ".idx":
            (copy / path.name).write_bytes(path.read_bytes())
    if dali_available():
        with pytest.raises(ManifestError, match="index_tar"):
            build_train_loader(_config(copy, "dali"), rank=0, world_size=1, batch_size=2, seed=0, device=CPU)


def test_resampled_shards_give_fixed_equal_epochs_deterministic_per_seed_epoch_and_rank(shard_dir):
    def labels(rank, seed=5, epochs=2):
        config = _config(shard_dir, "webdataset", shard_sampling="resampled", num_workers=0)
        loader = build_train_loader(config, rank=rank, world_size=2, batch_size=BATCH, seed=seed, device=CPU)
        out = []
        for _ in range(epochs):
            epoch = [batch_labels.tolist() for _, batch_labels in loader.iter_epoch()]
            assert len(epoch) == loader.steps_per_epoch == COUNT // (2 * BATCH)
            out.append([label for batch in epoch for label in batch])
        return out

    rank0, rank1 = labels(0), labels(1)
    assert rank0 == labels(0) and rank0 != labels(0, seed=6)  # the seed decides the stream
    assert rank0[0] != rank0[1] and rank0 != rank1  # each epoch and each rank draws its own shards
    assert all(0 <= label < COUNT for epoch in rank0 + rank1 for label in epoch)
    with pytest.raises(ValueError, match="webdataset-reader mode"):
        if resolve_reader("auto") == "dali":
            build_train_loader(_config(shard_dir, "auto", shard_sampling="resampled"), rank=0, world_size=1,
                               batch_size=BATCH, seed=0, device=CPU)
        else:
            build_train_loader(_config(shard_dir, "dali", shard_sampling="resampled"), rank=0, world_size=1,
                               batch_size=BATCH, seed=0, device=CPU)
