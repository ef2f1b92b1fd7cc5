"""The Dynamic Class Pool against a plain sequential LRU (the reference algorithm, §1.5 of docs f2c.md)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from facescale.f2c.pool import ClassPool, PoolTooSmallError

DIM = 4


class SequentialReferencePool:
    """The reference's per-label loop: OrderedDict LRU, free slots first, alternating rows per slot.

    One documented deviation is modelled: labels of the current batch are never the eviction victim.
    """

    def __init__(self, pool: ClassPool) -> None:
        self.features = pool.features.clone()
        self.q = pool.num_slots
        self.lru: OrderedDict[int, int] = OrderedDict()  # label -> slot, least recent first
        self.row_ptr = [0] * self.q
        self.next_free = 0

    def insert(self, features: torch.Tensor, labels: list[int]) -> set[int]:
        refreshed: set[int] = set()
        in_batch = set(labels)
        for feature, label in zip(features, labels, strict=True):
            if label not in self.lru:
                if self.next_free < self.q:
                    slot, self.next_free = self.next_free, self.next_free + 1
                else:
                    victim = next(lab for lab in self.lru if lab not in in_batch)
                    slot = self.lru.pop(victim)
                self.lru[label] = slot
                self.features[0, slot] = feature
                self.row_ptr[slot] = 1
            else:
                slot = self.lru.pop(label)
                self.lru[label] = slot
                self.features[self.row_ptr[slot], slot] = feature
                self.row_ptr[slot] ^= 1
                refreshed.add(slot)
        return refreshed


def _pool(q: int, seed: int = 0) -> ClassPool:
    return ClassPool(q, DIM, seed=seed)


def _batch(labels: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(len(labels), DIM, generator=g), dim=1)
    return feats, torch.tensor(labels)


def test_random_streams_match_the_sequential_reference():
    pool = _pool(12)
    ref = SequentialReferencePool(pool)
    rng = torch.Generator().manual_seed(5)
    for step in range(40):
        n = int(torch.randint(1, 15, (1,), generator=rng))
        labels = torch.randint(0, 30, (n,), generator=rng)
        while labels.unique().numel() > 12:
            labels = labels[:-1]
        feats, labels = _batch(labels.tolist(), 100 + step)
        refreshed = ref.insert(feats, labels.tolist())
        view = pool.insert(feats, labels, commit=True)
        assert torch.equal(pool.features, ref.features), step
        assert pool.lru_order().tolist() == list(ref.lru), step
        for label, slot in ref.lru.items():
            assert int(pool.lookup(torch.tensor([label]))) == slot
            assert int(pool.row_ptr[slot]) == ref.row_ptr[slot]
        assert set(torch.nonzero(view.refreshed).flatten().tolist()) == refreshed
        expect_mix = ref.features[0].clone()
        for slot in refreshed:
            expect_mix[slot] = ref.features[1, slot]
        assert torch.equal(view.weight_mix, expect_mix) and torch.equal(view.weight0, ref.features[0])


def test_duplicate_label_row_semantics():
    pool = _pool(6)
    init = pool.features.clone()
    feats, labels = _batch([7, 8, 8, 9, 9, 9], 1)
    view = pool.insert(feats, labels, commit=True)
    s7, s8, s9 = (int(pool.lookup(torch.tensor([lab]))) for lab in (7, 8, 9))
    # new, seen once: row 0 written, row 1 untouched, not refreshed (both views use row 0)
    assert torch.equal(pool.features[0, s7], feats[0]) and torch.equal(pool.features[1, s7], init[1, s7])
    assert not view.refreshed[s7] and torch.equal(view.weight_mix[s7], feats[0])
    # new, seen twice in the batch: first sighting row 0, second row 1; refreshed
    assert torch.equal(pool.features[0, s8], feats[1]) and torch.equal(pool.features[1, s8], feats[2])
    assert view.refreshed[s8] and torch.equal(view.weight_mix[s8], feats[2])
    # three sightings: rows 0, 1, 0; the last two survive, deterministically
    assert torch.equal(pool.features[0, s9], feats[5]) and torch.equal(pool.features[1, s9], feats[4])
    assert int(pool.row_ptr[s9]) == 1
    # already pooled, seen again: overwrites the older row (row_ptr), refreshed; unseen: row 0 in both views
    feats2, labels2 = _batch([8], 2)
    view2 = pool.insert(feats2, labels2, commit=True)
    assert torch.equal(pool.features[0, s8], feats2[0]) and torch.equal(pool.features[1, s8], feats[2])
    assert view2.refreshed[s8] and torch.equal(view2.weight_mix[s8], feats[2])
    assert not view2.refreshed[s7] and torch.equal(view2.weight_mix[s7], view2.weight0[s7])


def test_lru_evicts_least_recently_written_and_lookups_do_not_refresh():
    pool = _pool(3)
    for step, label in enumerate([1, 2, 3]):
        pool.insert(*_batch([label], step), commit=True)
    pool.lookup(torch.tensor([1]))  # a probe lookup: no recency change
    pool.insert(*_batch([2], 10), commit=True)
    pool.insert(*_batch([4], 11), commit=True)  # evicts 1, the least recently written
    assert pool.lru_order().tolist() == [3, 2, 4]
    assert int(pool.lookup(torch.tensor([1]))) == -1


def test_trial_pass_leaves_the_pool_bit_for_bit_and_sees_what_a_commit_would():
    pool = _pool(8)
    pool.insert(*_batch([1, 2, 3, 4, 5, 6, 7, 8], 0), commit=True)
    before = pool.pool_state()
    twin = _pool(8)
    twin.load_pool_state(before)
    feats, labels = _batch([9, 10, 2, 2, 3], 1)
    trial = pool.insert(feats, labels, commit=False)
    after = pool.pool_state()
    for key in ("features", "slot_label", "last_seen", "row_ptr"):
        assert torch.equal(before[key], after[key]), key
    assert before["clock"] == after["clock"]
    committed = twin.insert(feats, labels, commit=True)
    assert torch.equal(trial.weight0, committed.weight0)
    assert torch.equal(trial.weight_mix, committed.weight_mix)
    probe = torch.tensor([9, 10, 1, 2, 4, 11])
    assert torch.equal(trial.lookup(probe), committed.lookup(probe))
    assert int(trial.lookup(torch.tensor([1]))) == -1  # evicted in the trial view only
    assert int(pool.lookup(torch.tensor([1]))) >= 0


def test_refuses_more_distinct_labels_than_slots():
    pool = _pool(3)
    with pytest.raises(PoolTooSmallError, match="queue_size to at least 4"):
        pool.insert(*_batch([1, 2, 3, 4, 1], 0), commit=True)


def test_state_round_trip_and_init_is_positive_and_normalised():
    pool = _pool(5, seed=3)
    assert (pool.features >= 0).all()
    assert torch.allclose(pool.features.norm(dim=2), torch.ones(2, 5))
    pool.insert(*_batch([4, 5, 4], 0), commit=True)
    other = _pool(5, seed=9)
    other.load_pool_state(pool.pool_state())
    feats, labels = _batch([6, 4, 7], 1)
    a, b = pool.insert(feats, labels, commit=True), other.insert(feats, labels, commit=True)
    assert torch.equal(a.weight_mix, b.weight_mix) and pool.lru_order().tolist() == other.lru_order().tolist()
