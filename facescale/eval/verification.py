"""The LFW/insightface 10-fold pair-verification protocol on embeddings, and a raw-pixel baseline.

Metric: squared Euclidean distance between L2-normalized embeddings, d = |a/|a| - b/|b||^2 = 2 - 2*cos(a, b),
"same" when d < threshold, thresholds arange(0, 4, 0.01) - the same numbers as insightface's
`eval/verification.py` for the same embeddings. Folds are contiguous (KFold(10) without shuffle); the
threshold of each fold is the first grid value with the best accuracy on the other 9 folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from facescale.eval.roc import tar_at_far
from facescale.parallel.partition import class_partition

DISTANCE_THRESHOLDS = np.arange(0, 4, 0.01)
VERIFICATION_FARS: tuple[float, ...] = (1e-3, 1e-4)


@dataclass
class VerificationResult:
    """Outcome of the 10-fold protocol; thresholds are squared distances (cosine = 1 - d/2)."""

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    best_threshold: float  # grid threshold with the best accuracy on all pairs
    num_pairs: int
    tar_at_far: dict[float, float | None] = field(default_factory=dict)

    @property
    def best_cosine_threshold(self) -> float:
        """`best_threshold` expressed as a cosine similarity (same iff cosine > this)."""
        return 1.0 - self.best_threshold / 2.0


def _check_labels(issame: Sequence[bool] | np.ndarray, num_pairs: int) -> np.ndarray:
    labels = np.asarray(issame).reshape(-1)
    if labels.size != num_pairs:
        raise ValueError(f"{labels.size} same/different labels for {num_pairs} pairs")
    return labels.astype(bool)


def threshold_accuracies(distances: np.ndarray, issame: np.ndarray,
                         thresholds: np.ndarray = DISTANCE_THRESHOLDS) -> np.ndarray:
    """Accuracy of `distance < t` as the same-person prediction, for every t in `thresholds`."""
    if distances.size == 0:
        raise ValueError("cannot compute accuracy on zero pairs")
    same_sorted = np.sort(distances[issame])
    diff_sorted = np.sort(distances[~issame])
    true_accepts = np.searchsorted(same_sorted, thresholds, side="left")
    true_rejects = diff_sorted.size - np.searchsorted(diff_sorted, thresholds, side="left")
    return (true_accepts + true_rejects) / distances.size


def fold_bounds(num_pairs: int, num_folds: int = 10) -> list[tuple[int, int]]:
    """Contiguous [start, stop) folds, the first `num_pairs % num_folds` one longer (sklearn KFold layout)."""
    if num_pairs < num_folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {num_folds} folds")
    bounds = []
    for fold in range(num_folds):
        start, count = class_partition(num_pairs, num_folds, fold)
        bounds.append((start, start + count))
    return bounds


def verify_distances(distances: np.ndarray | Sequence[float], issame: Sequence[bool] | np.ndarray,
                     num_folds: int = 10, fars: Sequence[float] = VERIFICATION_FARS) -> VerificationResult:
    """Run the k-fold protocol on per-pair squared distances of L2-normalized embeddings (d = 2 - 2 cos)."""
    dist = np.asarray(distances, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(dist)):
        raise ValueError("pair distances contain NaN or inf; the embeddings are broken (zero norm?)")
    labels = _check_labels(issame, dist.size)
    fold_accuracies, fold_thresholds = [], []
    for start, stop in fold_bounds(dist.size, num_folds):
        train = np.ones(dist.size, dtype=bool)
        train[start:stop] = False
        best = int(np.argmax(threshold_accuracies(dist[train], labels[train])))
        threshold = DISTANCE_THRESHOLDS[best]
        test_acc = threshold_accuracies(dist[start:stop], labels[start:stop], np.array([threshold]))[0]
        fold_accuracies.append(float(test_acc))
        fold_thresholds.append(float(threshold))
    overall = threshold_accuracies(dist, labels)
    similarity = 1.0 - dist / 2.0
    if labels.any():
        tars = tar_at_far(similarity[labels], similarity[~labels], fars)
    else:
        tars = {far: None for far in fars}
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
        best_threshold=float(DISTANCE_THRESHOLDS[int(np.argmax(overall))]),
        num_pairs=int(dist.size),
        tar_at_far=tars,
    )


def l2_normalize(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length in their own float dtype (a `.bin`'s embeddings arrive as float64 sums, as
    insightface's verification forms them); a zero row is an error."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        bad = int(np.flatnonzero((norms.reshape(-1) == 0) | ~np.isfinite(norms.reshape(-1)))[0])
        raise ValueError(f"{what} row {bad} has zero or non-finite norm; cannot L2-normalize it")
    return x / norms


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared distances of normalized rows 2i and 2i+1 (the `.bin` pair order)."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"expected an even number of embedding rows [2P, D], got shape {emb.shape}")
    normalized = l2_normalize(emb)
    return np.sum(np.square(normalized[0::2] - normalized[1::2]), axis=1)


def verify_embeddings(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray,
                      num_folds: int = 10) -> VerificationResult:
    """10-fold verification of interleaved pair embeddings [2P, D] (rows 2i, 2i+1 form pair i)."""
    return verify_distances(pair_distances(embeddings), issame, num_folds)


def pixel_cosines(images: Sequence[np.ndarray | bytes], image_size: int | None = None,
                  source: str = "<images>", chunk_pairs: int = 64) -> np.ndarray:
    """Cosine of flattened, per-image mean-centred pixels of pairs (2i, 2i+1), decoded a chunk at a time."""
    from facescale.eval.decode import decode_image

    if len(images) % 2:
        raise ValueError(f"{source}: odd number of images ({len(images)}); pairs need 2 per entry")
    cosines = []
    for first in range(0, len(images), 2 * chunk_pairs):
        decoded = [decode_image(images[i], image_size, source, i)
                   for i in range(first, min(first + 2 * chunk_pairs, len(images)))]
        if len({d.shape for d in decoded}) > 1:
            raise ValueError(f"{source}: images {first}..{first + len(decoded) - 1} differ in size; "
                             "pass image_size to name the offending one")
        flat = np.stack(decoded).reshape(len(decoded), -1).astype(np.float64)
        flat -= flat.mean(axis=1, keepdims=True)
        norms = np.sqrt(np.einsum("ij,ij->i", flat, flat))
        dots = np.einsum("ij,ij->i", flat[0::2], flat[1::2])
        denom = norms[0::2] * norms[1::2]
        cosines.append(np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0))
    return np.concatenate(cosines)


def pixel_baseline(images: Sequence[np.ndarray | bytes], issame: Sequence[bool] | np.ndarray,
                   image_size: int | None = None, source: str = "<images>",
                   num_folds: int = 10) -> VerificationResult:
    """The same protocol on raw-pixel cosine: the floor any trained model must beat on this pair set."""
    cosines = pixel_cosines(images, image_size, source)
    return verify_distances(2.0 - 2.0 * cosines, issame, num_folds)
