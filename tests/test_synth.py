"""Synthetic identities: determinism, a disjoint held-out verification set, shuffling, difficulty."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from facescale.data.jpeg import decode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import decode_label
from facescale.data.synth import synthesize, verification_pairs
from facescale.data.synth_faces import render_identity
from facescale.eval.binfile import read_bin

SMALL = dict(identities=6, images_per_identity=4, holdout_identities=4, seed=11, image_size=64, shard_size=5,
             verify_pairs=12, verify_images_per_identity=3)


def _read_shards(directory):
    manifest = Manifest.load(directory)
    urls = [str(p) for p in manifest.shard_paths()]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
    return manifest, [(s["__key__"], s["jpg"], decode_label(s["lbl"])) for s in dataset]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(out, workers=1, **SMALL)


def test_manifest_and_shards_describe_every_sample(small_set):
    out, manifest = small_set
    assert (manifest.num_classes, manifest.num_samples, manifest.image_size) == (6, 24, 64)
    assert [s.num_samples for s in manifest.shards] == [5, 5, 5, 5, 4]
    assert manifest.samples_per_identity == [4] * 6 and "seed=11" in manifest.source
    loaded, samples = _read_shards(out)  # the webdataset library reads them as written
    assert loaded == manifest
    labels = [label for _, _, label in samples]
    assert sorted(labels) == sorted(list(range(6)) * 4)
    assert labels != sorted(labels), "samples must be globally shuffled"
    assert [key for key, _, _ in samples] == [f"{i:09d}" for i in range(24)]
    assert all(decode_jpeg(jpeg).shape == (64, 64, 3) for _, jpeg, _ in samples)


@pytest.mark.dali
def test_dali_cpu_pipeline_reads_the_synth_shards(small_set):
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from facescale.data.dali_reader import build_pipeline

    out, manifest = small_set
    pipe = build_pipeline([str(p) for p in manifest.shard_paths()], [str(p) for p in manifest.index_paths()],
                          shard_id=0, world_size=1, batch_size=4, num_threads=1, device_id=None, seed=0,
                          shuffle_buffer=1, mirror=False, random_shuffle=False)
    _, samples = _read_shards(out)
    for start in range(0, 24, 4):
        images, labels = (output.as_array() for output in pipe.run())
        assert labels.reshape(-1).tolist() == [label for _, _, label in samples[start:start + 4]]
        for image, (_, jpeg, _) in zip(images, samples[start:start + 4], strict=True):
            assert image.dtype == np.uint8 and np.array_equal(image, decode_jpeg(jpeg))  # HWC, as decoded


def test_verify_bin_is_balanced_and_disjoint_from_training(small_set):
    out, _ = small_set
    images, issame = read_bin(out / "verify.bin")
    assert len(issame) == 12 and sum(issame) == 6 and len(images) == 24
    _, samples = _read_shards(out)
    assert not {jpeg for _, jpeg, _ in samples} & set(images)
    assert all(decode_jpeg(image).shape == (64, 64, 3) for image in images[:4])


def test_output_is_byte_identical_for_any_worker_count(small_set, tmp_path):
    out, _ = small_set
    synthesize(tmp_path, workers=2, **SMALL)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_refuses_to_overwrite_unless_asked(small_set):
    out, _ = small_set
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthesize(out, workers=1, **SMALL)
    smaller = dict(SMALL, identities=2, holdout_identities=0)
    manifest = synthesize(out, workers=1, overwrite=True, **smaller)
    assert manifest.num_samples == 8 and len(list(out.glob("train-*.tar"))) == 2
    assert not (out / "verify.bin").exists(), "a stale verification set must not survive an overwrite"
    synthesize(out, workers=1, overwrite=True, **SMALL)  # restore for other tests using the fixture


def test_verification_pairs_are_unique_balanced_and_correct():
    pairs = list(verification_pairs(5, 4, 40, np.random.default_rng(0)))
    assert len(pairs) == 40 and sum(same for _, _, same in pairs) == 20
    assert all((a[0] == b[0]) == same and a != b for a, b, same in pairs)
    keys = {tuple(sorted([a, b])) for a, b, _ in pairs}
    assert len(keys) == 40
    few = list(verification_pairs(2, 2, 100, np.random.default_rng(0)))  # only 2 same pairs exist
    assert sum(same for _, _, same in few) == 2 and len(few) == 4


def test_identity_signal_exists_but_nuisance_dominates_pixels():
    """Same-identity images correlate more than different ones, yet far from the near-1 of aligned copies."""
    images = np.stack([render_identity(5, identity, 4, 64) for identity in range(24)]).astype(np.float64)
    flat = images.reshape(24, 4, -1)
    flat -= flat.mean(axis=2, keepdims=True)
    flat /= np.linalg.norm(flat, axis=2, keepdims=True)
    cosine = np.einsum("iad,jbd->ijab", flat, flat)
    same = np.mean([cosine[i, i, a, b] for i in range(24) for a in range(4) for b in range(a + 1, 4)])
    different = np.mean([cosine[i, j, 0, 1] for i in range(24) for j in range(24) if i != j])
    assert same > different + 0.1
    assert same < 0.6
    assert np.array_equal(render_identity(5, 3, 2, 64), render_identity(5, 3, 2, 64))
    assert not np.array_equal(render_identity(5, 3, 2, 64, stream=1), render_identity(5, 3, 2, 64))


def test_argument_errors():
    with pytest.raises(ValueError, match="holdout_identities >= 2"):
        synthesize("/nonexistent-never-created", 2, 2, 1, seed=0)
    with pytest.raises(ValueError, match="identities >= 1"):
        synthesize("/nonexistent-never-created", 0, 2, 0, seed=0)
