"""Partial FC sampling: positives kept, exact width, uniform negatives, per-rank and per-step seeding."""

from __future__ import annotations

import pytest
import torch

import facescale.heads.sampling as sampling
from facescale.heads.native import center_kernels
from facescale.heads.sampling import derive_seed, num_samples_for, sample_centers, sampling_generator

START, COUNT = 100, 50  # the shard holds global classes [100, 150)


def _labels(seed: int = 0, rows: int = 24) -> torch.Tensor:
    """Global-batch labels: some on this shard (with repeats), some elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randint(START, START + COUNT, (rows // 2,), generator=gen),
            torch.randint(0, START, (rows // 4,), generator=gen),
            torch.randint(START + COUNT, 400, (rows - rows // 2 - rows // 4,), generator=gen),
        ]
    )


def _draw(labels: torch.Tensor, num_sample: int, rank: int = 0, step: int = 0, seed: int = 7):
    return sample_centers(labels, START, COUNT, num_sample, sampling_generator(seed, rank, step))


def test_positives_kept_width_exact_and_labels_remapped() -> None:
    labels = _labels()
    positives = torch.unique(labels[(labels >= START) & (labels < START + COUNT)]) - START
    sample = _draw(labels, num_sample=20)
    assert sample.index is not None and sample.index.numel() == 20 == sample.width
    assert torch.equal(sample.index, torch.unique(sample.index))  # sorted, no repeats
    assert set(positives.tolist()) <= set(sample.index.tolist())
    assert sample.num_positive == positives.numel()
    local = (labels >= START) & (labels < START + COUNT)
    assert torch.equal(sample.target_col < 0, ~local)
    assert torch.equal(sample.index[sample.target_col[local]] + START, labels[local])


def test_negatives_are_the_highest_uniform_scores_of_the_step_stream() -> None:
    """The draw, rebuilt in plain Python: score every local class with torch.rand(COUNT) from the step's
    generator and keep the positives plus the highest-scoring other classes (a resumed run of any version
    that keeps this stream draws the same negatives)."""
    for seed in range(6):
        labels = _labels(seed, rows=8 + 8 * seed)
        positives = {int(v) - START for v in labels.tolist() if START <= v < START + COUNT}
        for num_sample in (len(positives) + 1, 20, COUNT - 1):
            scores = torch.rand(COUNT, generator=sampling_generator(7, 0, seed)).tolist()
            others = sorted((c for c in range(COUNT) if c not in positives), key=lambda c: -scores[c])
            expected = sorted(positives | set(others[: num_sample - len(positives)]))
            sample = sample_centers(labels, START, COUNT, num_sample, sampling_generator(7, 0, seed))
            assert sample.index.tolist() == expected, (seed, num_sample)
            assert sample.num_positive == len(positives)


def test_positives_only_when_they_exceed_the_budget_or_rate_is_zero() -> None:
    labels = _labels()
    num_positive = _draw(labels, 20).num_positive
    for budget in (0, num_positive - 1, num_positive):
        sample = _draw(labels, budget)
        assert sample.index.numel() == num_positive
        assert torch.equal(
            sample.index + START, torch.unique(labels[(labels >= START) & (labels < START + COUNT)])
        )
    assert num_samples_for(0.0, COUNT) == 0
    assert num_samples_for(0.1, 1001) == 100
    with pytest.raises(ValueError, match="head.sample_rate"):
        num_samples_for(1.5, COUNT)


def test_full_rate_keeps_the_whole_shard_without_an_index() -> None:
    labels = _labels()
    sample = _draw(labels, COUNT)
    assert sample.index is None and sample.width is None
    local = (labels >= START) & (labels < START + COUNT)
    assert torch.equal(sample.target_col, torch.where(local, labels - START, -1))


def test_negatives_are_uniform_without_replacement_chi_square() -> None:
    labels = torch.tensor([START + 3, START + 3, START + 17, START + 40, 5, 999])
    positives = {3, 17, 40}
    steps, num_sample = 3000, 12
    hits = torch.zeros(COUNT)
    for step in range(steps):
        index = _draw(labels, num_sample, step=step).index
        assert index.numel() == num_sample and positives <= set(index.tolist())
        hits[index] += 1
    negatives = torch.tensor([c for c in range(COUNT) if c not in positives])
    observed = hits[negatives]
    expected = steps * (num_sample - len(positives)) / len(negatives)
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 46 degrees of freedom: the 99.9% quantile is about 81.4; a biased sampler lands far above
    assert chi_square < 81.4, chi_square
    assert int(hits[list(positives)].min()) == steps


def test_seeding_differs_across_ranks_and_steps_and_repeats_exactly() -> None:
    labels = _labels()
    base = _draw(labels, 20, rank=0, step=5).index
    assert torch.equal(base, _draw(labels, 20, rank=0, step=5).index)  # resume re-draws the same sample
    assert not torch.equal(base, _draw(labels, 20, rank=1, step=5).index)
    assert not torch.equal(base, _draw(labels, 20, rank=0, step=6).index)
    assert not torch.equal(base, _draw(labels, 20, rank=0, step=5, seed=8).index)
    seeds = {derive_seed(1, r, s) for r in range(8) for s in range(200)}
    assert len(seeds) == 1600 and all(0 <= s < 2**63 for s in seeds)


def test_micro_steps_of_one_step_draw_independent_negatives_and_a_resume_draws_them_again():
    """Gradient accumulation: each micro-step samples its own negatives (not ~all the same ones), and a fresh
    head at the same step (a resumed run) draws exactly the same sequence."""
    from facescale.config.schema import HeadConfig
    from facescale.heads import build_head

    labels = torch.tensor([3, 500, 998, 41])

    def draws(micro_steps: int) -> list[set[int]]:
        head = build_head(HeadConfig(sample_rate=0.1), 1000, 8, seed=5)
        out = []
        for micro in range(micro_steps):
            emb = torch.randn(4, 8, requires_grad=True)
            loss, _ = head(emb, labels, 7, micro)
            loss.backward()
            out.append(set(head.last_sampled_classes.tolist()) - set(labels.tolist()))
        return out

    first = draws(3)
    assert all(len(negatives) == 96 for negatives in first)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        # independent draws of 96 of 996 share ~9; the same generator would share all 96
        assert len(first[a] & first[b]) < 30
    assert draws(3) == first


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: sampling uses torch.topk")
@pytest.mark.parametrize("n", [1, 7, 1000, 100_000])
def test_native_top_k_picks_the_same_ids_as_torch_topk(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    scores = torch.rand(n, generator=gen)
    scores[torch.randint(0, n, (n // 20,), generator=gen)] = 2.0  # positives, as sample_centers marks them
    positives = int((scores == 2.0).sum())
    for k in sorted({0, positives, min(positives + 1, n), max(n // 10, positives), max(n - 1, positives), n}):
        # budgets hold every positive (sample_centers' case); rand's floats do not tie
        expected = torch.topk(scores, k).indices.sort().values
        assert torch.equal(center_kernels().top_k_sorted(scores, k), expected), (n, k)


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: sampling uses torch.topk")
def test_native_top_k_takes_ties_lowest_id_first_and_refuses_negative_scores() -> None:
    scores = torch.tensor([0.5, 0.7, 0.5, 0.5, 0.9, 0.5])
    assert center_kernels().top_k_sorted(scores, 3).tolist() == [0, 1, 4]
    assert center_kernels().top_k_sorted(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="non-negative"):
        center_kernels().top_k_sorted(torch.tensor([0.1, -0.2, 0.3]), 1)


def test_the_native_and_the_torch_draw_agree(monkeypatch) -> None:
    labels = _labels(seed=3, rows=64)
    native = _draw(labels, num_sample=30, step=5)
    monkeypatch.setattr(sampling, "native_kernels_for", lambda *tensors: None)
    fallback = _draw(labels, num_sample=30, step=5)
    assert torch.equal(native.index, fallback.index) and torch.equal(native.target_col, fallback.target_col)


@pytest.mark.parametrize("count", [1, 7, 5000, 100_000])
def test_a_seed_draws_what_torch_rand_of_its_generator_scores(count: int) -> None:
    """sample_centers given a seed (as the head passes it; on the CPU the native kernels draw the stream
    themselves) keeps the positives plus the highest of torch.rand(count) from a generator seeded with it,
    rebuilt here in plain Python; seeds above 2^32 included (torch's CPU generator keeps their low 32
    bits)."""
    gen = torch.Generator().manual_seed(count)
    for seed in (0, 12345, 2**40 + 5, 2**63 - 1, sampling.sampling_seed(7, 3, 11)):
        labels = torch.randint(0, 2 * count + 20, (64,), generator=gen)
        positives = {int(v) - 10 for v in labels.tolist() if 10 <= v < 10 + count}
        scores = torch.rand(count, generator=torch.Generator().manual_seed(seed)).tolist()
        others = sorted((c for c in range(count) if c not in positives), key=lambda c: -scores[c])
        for num_sample in sorted({len(positives), len(positives) + 1, max(count // 10, 64), count - 1}):
            if num_sample >= count or num_sample < 0:
                continue
            expected = sorted(positives | set(others[: max(0, num_sample - len(positives))]))
            sample = sample_centers(labels, 10, count, num_sample, seed)
            assert sample.index.tolist() == expected, (count, seed, num_sample)
            local = (labels >= 10) & (labels < 10 + count)
            assert torch.equal(sample.index[sample.target_col[local]] + 10, labels[local])


def test_a_seed_without_native_kernels_draws_the_same(monkeypatch) -> None:
    labels = _labels(seed=4, rows=64)
    seed = sampling.sampling_seed(7, 0, 5)
    native = sample_centers(labels, START, COUNT, 30, seed)
    monkeypatch.setattr(sampling, "center_kernels", lambda: None)
    monkeypatch.setattr(sampling, "native_kernels_for", lambda *tensors: None)
    fallback = sample_centers(labels, START, COUNT, 30, seed)
    generator = sample_centers(labels, START, COUNT, 30, sampling_generator(7, 0, 5))
    assert torch.equal(native.index, fallback.index) and torch.equal(native.index, generator.index)
    assert torch.equal(native.target_col, fallback.target_col)


@pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: sampling uses torch.topk")
def test_native_draw_refuses_ids_outside_the_shard() -> None:
    with pytest.raises(ValueError, match=r"positive ids in \[0, 10\]"):
        center_kernels().draw_top_k(1, 10, torch.tensor([3, 11]), 5)
    # the spare slot (id == count) is ignored; k >= count keeps every id
    assert center_kernels().draw_top_k(1, 10, torch.tensor([10, 10]), 10).tolist() == list(range(10))
    assert center_kernels().draw_top_k(1, 10, torch.tensor([2]), 0).tolist() == []
