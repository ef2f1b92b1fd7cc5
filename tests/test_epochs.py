"""Epochs of both readers: each sample at most once per epoch across ranks, exactly N mod (W*B) left out,
the same order for the same seed and epoch, and an exact resumable cursor (state_dict/load_state_dict)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from facescale.config.schema import DataConfig
from facescale.data import wds_reader
from facescale.data.jpeg import encode_jpeg
from facescale.data.loader import build_train_loader, dali_available
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import ShardWriter
from facescale.data.synth_faces import render_identity
from facescale.data.tar_samples import epoch_plan
from tests.distributed import run_ranks

SIZE, COUNT = 16, 23  # shards of 7, 7, 7, 2 samples
CPU = torch.device("cpu")
READERS = ["webdataset"] + (["dali"] if dali_available() else [])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """23 samples whose label is their index, in uneven shards."""
    out = tmp_path_factory.mktemp("epochs")
    with ShardWriter(out, shard_size=7) as writer:
        for label, image in enumerate(render_identity(5, 0, COUNT, SIZE)):
            writer.write(encode_jpeg(image), label)
    Manifest(num_classes=COUNT, num_samples=COUNT, image_size=SIZE, source="test", shards=writer.shards,
             samples_per_identity=[1] * COUNT).save(out)
    return out


def _loader(shard_dir, reader, rank=0, world=1, batch=2, seed=3, **overrides):
    config = DataConfig(shards=str(shard_dir), reader=reader, image_size=SIZE, num_workers=0, dali_threads=1,
                        shuffle_buffer=4, random_mirror=True)
    return build_train_loader(dataclasses.replace(config, **overrides), rank=rank, world_size=world,
                              batch_size=batch, seed=seed, device=CPU)


def _epoch_labels(rank, world, shard_dir, batch, epochs):
    """Per reader: the labels this rank yields in each of `epochs` epochs."""
    torch.set_num_threads(1)
    out = {}
    for reader in READERS:
        loader = _loader(shard_dir, reader, rank, world, batch)
        out[reader] = [torch.cat([labels for _, labels in loader.iter_epoch()]).tolist()
                       for _ in range(epochs)]
    return out


def _check_epochs(per_rank, world, batch):
    steps = COUNT // (world * batch)
    for reader in READERS:
        for epoch in range(2):
            labels = [per_rank[rank][reader][epoch] for rank in range(world)]
            assert all(len(part) == steps * batch for part in labels)
            union = [label for part in labels for label in part]
            assert len(set(union)) == len(union) == COUNT - COUNT % (world * batch)
        assert per_rank[0][reader][0] != per_rank[0][reader][1]  # a new order each epoch


def test_three_ranks_see_each_sample_at_most_once_per_epoch(shard_dir):
    _check_epochs(run_ranks(_epoch_labels, 3, str(shard_dir), 3, 2), world=3, batch=3)


def test_two_ranks_see_each_sample_at_most_once_per_epoch(shard_dir):
    _check_epochs([_epoch_labels(rank, 2, shard_dir, 4, 2) for rank in range(2)], world=2, batch=4)


@pytest.mark.parametrize("reader", READERS)
def test_same_seed_and_epoch_give_the_same_batches(shard_dir, reader):
    first, second = _loader(shard_dir, reader), _loader(shard_dir, reader)
    pairs = zip(first.iter_epoch(), second.iter_epoch(), strict=True)
    for (a_images, a_labels), (b_images, b_labels) in pairs:
        assert torch.equal(a_labels, b_labels) and torch.equal(a_images, b_images)
    other = torch.cat([labels for _, labels in _loader(shard_dir, reader, seed=4).iter_epoch()])
    assert other.tolist() != torch.cat([labels for _, labels in first.iter_epoch()]).tolist()


def _take(loader, count):
    return [(images.clone(), labels.clone()) for images, labels in itertools.islice(iter(loader), count)]


@pytest.mark.parametrize("reader,workers,sampling", [("webdataset", 0, "exact"), ("webdataset", 3, "exact"),
                                                     ("webdataset", 2, "resampled")]
                         + ([("dali", 0, "exact")] if dali_available() else []))
def test_restored_cursor_yields_exactly_the_uninterrupted_batches(shard_dir, reader, workers, sampling):
    reference = _take(_loader(shard_dir, reader, num_workers=workers, shard_sampling=sampling), 3 * 11)
    for consumed in (4, 11, 16):  # 11 steps per epoch
        interrupted = _loader(shard_dir, reader, num_workers=workers, shard_sampling=sampling)
        _take(interrupted, consumed)
        state = interrupted.state_dict()
        assert state == {"epoch": consumed // 11, "step_in_epoch": consumed % 11}
        restored = _loader(shard_dir, reader, num_workers=workers, shard_sampling=sampling)
        restored.load_state_dict(state)
        for (images, labels), (ref_images, ref_labels) in zip(_take(restored, 7), reference[consumed:],
                                                              strict=False):
            assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
        assert restored.seen == 7 * 2 and restored.skipped == 0
    with pytest.raises(ValueError, match="saved with another global batch size"):
        restored.load_state_dict({"epoch": 0, "step_in_epoch": 12})


def test_webdataset_resume_reads_past_the_cursor_without_decoding(shard_dir, monkeypatch):
    """Under on_bad_sample=error the batches before a resume's cursor are read, not decoded, and the
    batches after it are the uninterrupted run's (same draws for mirror and augmentation)."""
    options = {"random_shift": 2, "brightness": 0.2}
    reference = list(_loader(shard_dir, "webdataset", **options).iter_epoch())
    decodes = []
    real = wds_reader.decode_jpeg
    monkeypatch.setattr(wds_reader, "decode_jpeg", lambda *args: decodes.append(1) or real(*args))
    restored = _loader(shard_dir, "webdataset", **options)
    restored.load_state_dict({"epoch": 0, "step_in_epoch": 9})  # 11 steps of 2
    batches = list(restored.iter_epoch())
    assert len(batches) == 2 and len(decodes) == 2 * 2
    for (images, labels), (ref_images, ref_labels) in zip(batches, reference[9:], strict=True):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_webdataset_resume_late_in_an_epoch_is_not_taken_for_hung_storage(shard_dir, policy):
    """The first batch after a resume waits for the workers to read past the batches before the cursor:
    it gets data.read_timeout_s for each of them (they once failed as LoaderTimedOut every time)."""
    options = {"num_workers": 1, "on_bad_sample": policy}
    reference = list(_loader(shard_dir, "webdataset", batch=1, **options).iter_epoch())
    restored = _loader(shard_dir, "webdataset", batch=1, read_timeout_s=0.5, **options)
    restored.load_state_dict({"epoch": 0, "step_in_epoch": 21})  # 23 steps of 1: 0.5 s x 22 for the first
    batches = [(images.clone(), labels.clone()) for images, labels in restored.iter_epoch()]
    for (images, labels), (ref_images, ref_labels) in zip(batches, reference[21:], strict=True):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


def test_webdataset_epoch_plan_covers_each_rank_part_once():
    sizes = [7, 7, 7, 2]
    for world, batch, workers in [(2, 4, 1), (3, 2, 2), (2, 1, 3)]:
        steps = sum(sizes) // (world * batch)
        covered = []
        for rank in range(world):
            plans = epoch_plan(sizes, epoch=1, seed=0, rank=rank, world_size=world, steps=steps,
                               batch_size=batch, num_workers=workers)
            covered += [(shard, p) for plan in plans for shard, lo, hi in plan for p in range(lo, hi)]
        assert sorted(covered) == [(s, p) for s, n in enumerate(sizes) for p in range(n)]


@pytest.mark.parametrize("reader", READERS)
def test_a_cursor_recounted_for_another_micro_batch_continues_the_same_samples(shard_dir, reader):
    """Another schedule.grad_accumulation on resume (same global batch, half the micro-batch): the cursor
    saved after 3 batches of 4 continues at batch 6 of 2, so epoch 0 goes on exactly as a run with batches of
    2 throughout (the cursor was taken as 3 batches of 2: 6 samples trained again, 6 never)."""
    from facescale.train.resume_check import recount_cursor

    torch.set_num_threads(1)
    before = _loader(shard_dir, reader, batch=4)
    first = torch.cat([labels for _, labels in _take(before, 3)]).tolist()
    after = _loader(shard_dir, reader, batch=2)
    after.load_state_dict(recount_cursor(before.state_dict(), 4, 2, after.steps_per_epoch))
    rest = torch.cat([labels for _, labels in after.iter_epoch()]).tolist()
    whole = torch.cat([labels for _, labels in _loader(shard_dir, reader, batch=2).iter_epoch()]).tolist()
    assert first + rest == whole and len(set(whole)) == len(whole) == 22
