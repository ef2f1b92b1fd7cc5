"""10-fold verification protocol, TAR@FAR and ROC image, against hand counts and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from facescale.eval.roc import far_is_resolvable, roc_curve, roc_figure, tar_at_far, tar_at_nearest_far
from facescale.eval.verification import (
    fold_bounds,
    pair_distances,
    pixel_baseline,
    pixel_cosines,
    threshold_accuracies,
    verify_distances,
    verify_embeddings,
)


def brute_force_protocol(embeddings: np.ndarray, issame: list[bool], nfolds: int = 10) -> tuple[float, float]:
    """Independent, loop-by-loop restatement of the standard protocol (sklearn KFold(nfolds), no shuffle)."""
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = [float(np.sum((emb[2 * i] - emb[2 * i + 1]) ** 2)) for i in range(len(issame))]
    n = len(dist)
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    thresholds = list(np.arange(0, 4, 0.01))  # same float values as the reference implementation
    accs = []
    start = 0
    for size in sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i < start or i >= start + size]
        start += size
        best_acc, best_t = -1.0, None
        for t in thresholds:
            correct = sum(1 for i in train if (dist[i] < t) == issame[i])
            acc = correct / len(train)
            if acc > best_acc:  # strict: first threshold wins ties, like np.argmax
                best_acc, best_t = acc, t
        accs.append(sum(1 for i in test if (dist[i] < best_t) == issame[i]) / len(test))
    return float(np.mean(accs)), float(np.std(accs))


def test_accuracy_on_hand_checked_case() -> None:
    # distances 0.5, 1.0, 1.5, 2.5 labelled same, same, diff, diff
    dist = np.array([0.5, 1.0, 1.5, 2.5])
    same = np.array([True, True, False, False])
    acc = threshold_accuracies(dist, same, np.array([0.0, 0.5, 0.51, 1.01, 1.6, 3.0]))
    # t=0: all "diff" -> 2/4; t=0.5: 0.5<0.5 is false -> 2/4; t=0.51: 3/4; t=1.01: 4/4; t=1.6: 3/4; t=3: 2/4
    np.testing.assert_allclose(acc, [0.5, 0.5, 0.75, 1.0, 0.75, 0.5])


def test_pair_distance_is_two_minus_two_cosine() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 5))
    a, b = emb[0::2], emb[1::2]
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(pair_distances(emb), 2 - 2 * cos, atol=1e-12)


def test_folds_match_kfold_layout() -> None:
    assert fold_bounds(23, 10) == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17),
                                   (17, 19), (19, 21), (21, 23)]
    with pytest.raises(ValueError, match="cannot be split"):
        fold_bounds(9, 10)


@pytest.mark.parametrize("num_pairs,seed", [(60, 1), (137, 2), (300, 3)])
def test_ten_fold_matches_brute_force(num_pairs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    issame = [bool(x) for x in rng.integers(0, 2, num_pairs)]
    identity = rng.normal(size=(num_pairs, 16))
    emb = np.empty((2 * num_pairs, 16), dtype=np.float32)
    for i, same in enumerate(issame):
        emb[2 * i] = identity[i] + rng.normal(scale=0.9, size=16)
        emb[2 * i + 1] = (identity[i] if same else rng.normal(size=16)) + rng.normal(scale=0.9, size=16)
    result = verify_embeddings(emb, issame)
    ref_mean, ref_std = brute_force_protocol(emb.astype(np.float64), issame)
    assert result.num_pairs == num_pairs
    assert len(result.fold_accuracies) == 10
    assert result.accuracy_mean == pytest.approx(ref_mean, abs=1e-12)
    assert result.accuracy_std == pytest.approx(ref_std, abs=1e-12)
    assert 0.5 < result.accuracy_mean < 1.0  # informative: neither chance nor trivially separable


def test_perfectly_separable_set_scores_one() -> None:
    dist = np.r_[np.full(50, 0.3), np.full(50, 1.8)]
    same = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    result = verify_distances(dist, same)
    assert result.accuracy_mean == 1.0 and result.accuracy_std == 0.0
    assert result.best_threshold == pytest.approx(0.31)  # first grid value above every genuine distance
    assert result.best_cosine_threshold == pytest.approx(1 - 0.31 / 2)
    assert result.tar_at_far[1e-3] is None and result.tar_at_far[1e-4] is None  # only 50 impostors


def test_label_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="labels for 20 pairs"):
        verify_distances(np.zeros(20), [True] * 19)


def test_tar_at_far_on_known_scores() -> None:
    impostor = np.arange(1000) / 1000.0  # 0.000 ... 0.999
    genuine = np.array([0.9975, 0.9985, 0.9995, 0.5, 0.9989])
    tars = tar_at_far(genuine, impostor, fars=(1e-3, 1e-2, 1e-4))
    # FAR 1e-3 allows 1 false accept: threshold 0.998 (2nd highest), accept > 0.998 -> 0.9985, 0.9995, 0.9989
    assert tars[1e-3] == pytest.approx(3 / 5)
    # FAR 1e-2 allows 10: threshold 0.989 -> all but 0.5
    assert tars[1e-2] == pytest.approx(4 / 5)
    assert tars[1e-4] is None  # 1000 impostors cannot resolve 1e-4
    assert far_is_resolvable(1e-3, 1000) and not far_is_resolvable(1e-3, 999)


def test_tar_at_far_respects_far_with_ties() -> None:
    impostor = np.r_[np.full(10, 0.9), np.zeros(990)]  # ten tied high impostors
    tars = tar_at_far([0.95, 0.9, 0.1], impostor, fars=(1e-3,))
    assert tars[1e-3] == pytest.approx(1 / 3)  # accepting 0.9 would let 10 impostors in (FAR 1e-2)


def test_tar_at_nearest_far_reads_the_roc_as_eval_ijbc_does() -> None:
    """Worked by hand from eval_ijbc.py's rule (the vertex of scikit-learn's ROC nearest the FAR)."""
    genuine = [0.99, 0.9, 0.8, 0.7, 0.6]
    impostor = [0.95, 0.75, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    # (FAR, TAR) vertices: (0,0) (0,.2) (.1,.2) (.1,.6) (.2,.6) (.2,1) (1,1); the rest lie on straight runs
    tars = tar_at_nearest_far(genuine, impostor, fars=(0.18, 0.12, 0.01))
    assert tars == {0.18: 1.0, 0.12: 0.6, 0.01: 0.2}  # nearest FAR .2, .1, 0; highest TAR among them
    strict = tar_at_far(genuine, impostor, fars=(0.18, 0.12, 0.01))
    assert strict == {0.18: 0.6, 0.12: 0.6, 0.01: None}  # FAR <= target: one false accept at most
    # a straight run is one segment: (0,.6) -> (.5,.6) has no point at FAR .4 (scikit-learn drops it), so
    # FAR .42 reads the vertex at .5, whose highest TAR is .9
    genuine = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.88, 0.87, 0.86, 0.80]
    impostor = [0.93, 0.92, 0.91, 0.90, 0.89, 0.85, 0.84, 0.83, 0.82, 0.81]
    assert tar_at_nearest_far(genuine, impostor, fars=(0.42,)) == {0.42: 0.9}
    assert tar_at_far(genuine, impostor, fars=(0.42,)) == {0.42: 0.6}


def test_roc_curve_endpoints_and_image() -> None:
    rng = np.random.default_rng(4)
    genuine, impostor = rng.normal(1, 0.5, 400), rng.normal(0, 0.5, 4000)
    far, tar, _ = roc_curve(genuine, impostor)
    assert far[-1] == 1.0 and tar[-1] == 1.0
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    backends = ["pil"]
    try:
        import matplotlib  # noqa: F401
        backends.append("matplotlib")
    except ImportError:  # a dev extra; the PIL drawing is the fallback
        pass
    for backend in backends:
        image = roc_figure({"model": (genuine, impostor)}, title="test", size=(320, 240), backend=backend)
        assert image.dtype == np.uint8 and image.shape == (240, 320, 3)
        assert image.min() < 128 < image.max()  # something was drawn on the white canvas


def test_pixel_baseline_separates_near_duplicates() -> None:
    rng = np.random.default_rng(5)
    images, issame = [], []
    for i in range(40):
        base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        same = i % 2 == 0
        other = np.clip(base.astype(int) + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8)
        images += [base, other if same else rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)]
        issame.append(same)
    result = pixel_baseline(images, issame, image_size=12)
    assert result.accuracy_mean == 1.0
    a, b = (images[2].astype(float).ravel(), images[3].astype(float).ravel())
    a, b = a - a.mean(), b - b.mean()
    cosines = pixel_cosines(images[:6], chunk_pairs=2)  # chunk boundary inside the set
    assert cosines[1] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)
    with pytest.raises(ValueError, match="expected 16x16"):
        pixel_baseline(images, issame, image_size=16, source="demo.bin")
