"""Identity-indexed access: every image of a label found from the .idx files, read back byte-exact."""

from __future__ import annotations

import numpy as np
import pytest

from facescale.data.identity_index import IdentityIndex
from facescale.data.jpeg import encode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import ShardWriter
from facescale.data.synth_faces import render_identity

COUNTS = [3, 1, 0, 5]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Identities with 3, 1, 0 and 5 images, shuffled over shards of 3; returns (dir, {label: [jpeg]})."""
    out = tmp_path_factory.mktemp("ids")
    truth = {label: [encode_jpeg(image) for image in render_identity(1, label, count, 16)] if count else []
             for label, count in enumerate(COUNTS)}
    samples = [(label, jpeg) for label, jpegs in truth.items() for jpeg in jpegs]
    with ShardWriter(out, shard_size=3) as writer:
        for position in np.random.default_rng(0).permutation(len(samples)).tolist():
            writer.write(samples[position][1], samples[position][0])
    Manifest(num_classes=len(COUNTS), num_samples=len(samples), image_size=16, source="test",
             shards=writer.shards, samples_per_identity=COUNTS).save(out)
    return out, truth


def test_locations_and_reads_match_what_was_written(indexed):
    directory, truth = indexed
    index = IdentityIndex.build(directory)
    assert index.num_classes == 4 and [index.count(label) for label in range(4)] == COUNTS
    for label, jpegs in truth.items():
        read = [index.read_jpeg(location) for location in index.locations(label)]
        assert sorted(read) == sorted(jpegs)
    index.close()


def test_sample_draws_distinct_images_when_it_can(indexed):
    directory, truth = indexed
    index = IdentityIndex.build(directory)
    rng = np.random.default_rng(1)
    drawn = index.sample(3, 4, rng)
    assert len(set(drawn)) == 4 and set(drawn) <= set(truth[3])
    assert index.sample(1, 2, rng) == [truth[1][0]] * 2  # one image: drawn with replacement
    with pytest.raises(ValueError, match="identity 2 has no images"):
        index.sample(2, 1, rng)


def test_bad_labels_and_missing_index_are_named(indexed, tmp_path):
    directory, _ = indexed
    for path in directory.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    manifest = Manifest.load(tmp_path)
    manifest.num_classes, manifest.samples_per_identity = 2, []
    manifest.save(tmp_path)
    with pytest.raises(ValueError, match=r"label 3 outside \[0, 2\)"):
        IdentityIndex.build(tmp_path)
    (tmp_path / "train-000000.idx").unlink()
    with pytest.raises(FileNotFoundError, match="train-000000.idx is missing"):
        IdentityIndex.build(tmp_path)
