"""Identity pairs (over facescale.data.identity_index), their per-pass dealing, and the dual-batch mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facescale.data.identity_index import IdentityIndex
from facescale.data.jpeg import decode_jpeg, encode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import ShardWriter
from facescale.f2c.dual_loader import mix_batches
from facescale.f2c.identity_loader import IdentityPairs

SIZE = 16
IMAGES_PER_IDENTITY = [1, 3, 2, 1, 4, 2, 0, 2]  # identity 6 has no image: never drawn


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(0)
    samples = [
        (label, rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        for label, count in enumerate(IMAGES_PER_IDENTITY)
        for _ in range(count)
    ]
    order = rng.permutation(len(samples))
    with ShardWriter(out, shard_size=5) as writer:
        for i in order:
            writer.write(encode_jpeg(samples[i][1]), samples[i][0])
    Manifest(
        num_classes=len(IMAGES_PER_IDENTITY),
        num_samples=len(samples),
        image_size=SIZE,
        source="test",
        shards=writer.shards,
        samples_per_identity=IMAGES_PER_IDENTITY,
    ).save(out)
    return Manifest.load(out)


def test_pairs_two_distinct_images_or_one_image_and_its_mirror(shards):
    index = IdentityIndex.build(shards.directory)
    pairs = IdentityPairs(
        index, rank=0, world_size=1, identities_per_batch=7, seed=1, mirror=False, image_size=SIZE
    )
    first, second, labels = pairs.make_batch(0, 0)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4, 5, 7]
    for a, b, label in zip(first.numpy(), second.numpy(), labels.tolist(), strict=True):
        images = [decode_jpeg(index.read_jpeg(location)) for location in index.locations(label)]
        ia = next(i for i, im in enumerate(images) if np.array_equal(im, a))
        if len(images) == 1:
            assert np.array_equal(b, a[:, ::-1])
        else:
            ib = next(i for i, im in enumerate(images) if np.array_equal(im, b))
            assert ia != ib


def test_every_identity_once_per_pass_over_ranks_and_reshuffled(shards):
    index = IdentityIndex.build(shards.directory)
    made = [
        IdentityPairs(
            index, rank=r, world_size=2, identities_per_batch=2, seed=4, mirror=True, image_size=SIZE
        )
        for r in range(2)
    ]
    for pass_number in range(3):
        dealt = np.concatenate([p.rank_identities(pass_number) for p in made])
        assert set(dealt.tolist()) == {0, 1, 2, 3, 4, 5, 7} and len(dealt) == 8  # one wrapped as padding
    orders = {tuple(made[0].rank_identities(n).tolist()) for n in range(6)}
    assert len(orders) > 1
    stream, per_pass = iter(made[0]), made[0].batches_per_pass
    labels = [next(stream)[2].tolist() for _ in range(2 * per_pass)]
    assert [lab for batch in labels[:per_pass] for lab in batch] == made[0].rank_identities(0).tolist()[:4]
    assert [lab for batch in labels[per_pass:] for lab in batch] == made[0].rank_identities(1).tolist()[:4]
    with pytest.raises(ValueError, match="identities_per_rank"):
        IdentityPairs(
            index, rank=0, world_size=2, identities_per_batch=5, seed=0, mirror=True, image_size=SIZE
        )


def test_mix_batches_as_the_reference():
    inst_images, inst_labels = torch.arange(4.0).view(4, 1), torch.tensor([10, 11, 12, 13])
    first, second, ids = (
        torch.tensor([[100.0], [101.0]]),
        torch.tensor([[200.0], [201.0]]),
        torch.tensor([1, 2]),
    )
    (x, lx), (y, ly) = mix_batches((inst_images, inst_labels), first, second, ids)
    assert x.flatten().tolist() == [100, 101, 0, 1] and lx.tolist() == [1, 2, 10, 11]
    assert y.flatten().tolist() == [200, 201, 2, 3] and ly.tolist() == [1, 2, 12, 13]


@pytest.mark.parametrize("workers", [0, 2])
def test_dual_loader_cursor_restores_both_streams_exactly(shards, workers):
    import dataclasses
    import itertools

    from facescale.config.schema import DataConfig
    from facescale.data.loader import build_train_loader
    from facescale.f2c.dual_loader import DualLoader
    from facescale.f2c.identity_loader import build_identity_loader

    def loader():
        config = DataConfig(shards=str(shards.directory), reader="webdataset", image_size=SIZE, num_workers=0,
                            shuffle_buffer=4)
        instances = build_train_loader(dataclasses.replace(config), rank=0, world_size=1, batch_size=2,
                                       seed=3, device=torch.device("cpu"))
        pairs = IdentityPairs(IdentityIndex.build(shards.directory), rank=0, world_size=1,
                              identities_per_batch=2, seed=1, mirror=True, image_size=SIZE)
        return DualLoader(instances, build_identity_loader(pairs, workers), torch.device("cpu"))

    def flat(batches):
        return [t.clone() for (x, y) in batches for t in (*x, *y)]

    reference = flat(itertools.islice(iter(loader()), 12))  # 7 instance batches per epoch: crosses one
    first = loader()
    flat(itertools.islice(iter(first), 9))
    state = first.state_dict()
    assert state == {"epoch": 1, "step_in_epoch": 2, "identity_batches": 9}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = flat(itertools.islice(iter(resumed), 3))
    assert len(rest) == len(reference[9 * 4:]) and all(
        torch.equal(a, b) for a, b in zip(rest, reference[9 * 4:], strict=True))


@pytest.mark.parametrize(("identities", "world", "per_batch"), [(1000, 3, 64), (7, 2, 3), (130, 1, 64)])
def test_the_batches_of_one_pass_draw_every_identity(identities, world, per_batch):
    """Over all ranks and batches of a pass, every identity with images is drawn (1,000 identities at world 3
    and 64 per batch used to leave 40 out); the ones drawn twice only fill the last batches."""
    starts = np.arange(identities + 1, dtype=np.int64)  # one image per identity
    index = IdentityIndex([], starts, np.zeros(identities, np.int32), np.zeros(identities, np.int64),
                          np.ones(identities, np.int32))
    ranks = [IdentityPairs(index, rank=r, world_size=world, identities_per_batch=per_batch, seed=2,
                           mirror=False, image_size=SIZE) for r in range(world)]
    for pass_number in range(2):
        # the batches make_batch makes: consecutive slices of the rank's identities of the pass
        batches = [p.rank_identities(pass_number)[b * per_batch : (b + 1) * per_batch] for p in ranks
                   for b in range(p.batches_per_pass)]
        drawn = np.concatenate(batches)
        assert set(drawn.tolist()) == set(range(identities))
        assert len(drawn) - identities < world * per_batch  # padding below one batch per rank
        assert all(len(batch) == per_batch for batch in batches)
        assert np.array_equal(ranks[-1].batch_labels(pass_number, 0), batches[-ranks[-1].batches_per_pass])
