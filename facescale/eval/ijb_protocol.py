"""The IJB 1:1 verification protocol as arcface reports it: image -> media -> template -> pair scores.

Test modes (published arcface_torch IJB tables use all three):
    F1  flip-sum: an image's feature is the sum of the embeddings of the image and its mirror image.
    N1  keep the embedding norm into template pooling (N0 L2-normalizes every image feature first).
    D1  weight every image feature by its face detector score.
Images of one media (frames of one video) are averaged, a template's medias summed, the sum L2-normalized;
a pair's score is the cosine of its two templates. TAR@FAR is read off the ROC as eval_ijbc.py reads it (the
point nearest each FAR), with the TAR at an empirical FAR <= each target beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facescale.eval.roc import STANDARD_FARS, tar_at_far, tar_at_nearest_far
from facescale.eval.verification import l2_normalize


@dataclass(frozen=True)
class IJBMode:
    """Which of the F1 / N1 / D1 options are on; the defaults are those of the published tables."""

    flip: bool = True
    norm_score: bool = True
    detector_score: bool = True

    @property
    def label(self) -> str:
        return f"F{int(self.flip)} N{int(self.norm_score)} D{int(self.detector_score)}"

    def describe(self) -> str:
        return (f"{self.label}: flip-sum {'on' if self.flip else 'off'}, embedding norm "
                f"{'kept' if self.norm_score else 'dropped'}, detector-score weighting "
                f"{'on' if self.detector_score else 'off'}")


def image_features(embeddings: np.ndarray, detector_scores: np.ndarray, mode: IJBMode) -> np.ndarray:
    """Per-image features for pooling from extracted embeddings (already flip-summed when mode.flip)."""
    feats = np.asarray(embeddings, dtype=np.float64)
    if not mode.norm_score:
        feats = l2_normalize(feats, "image embeddings")
    if mode.detector_score:
        feats = feats * np.asarray(detector_scores, dtype=np.float64)[:, None]
    return feats


def template_features(features: np.ndarray, template_ids: np.ndarray,
                      media_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, L2-normalized template features): images averaged per (template, media),
    media means summed per template. A template whose sum is zero (D1 with every face's detector score 0)
    stays zero and scores 0 with any template, as scikit-learn's normalize leaves it in eval_ijbc.py."""
    feats = np.asarray(features, dtype=np.float64)
    keys = np.stack([np.asarray(template_ids), np.asarray(media_ids)], axis=1)
    media_keys, media_of_image = np.unique(keys, axis=0, return_inverse=True)
    media_of_image = media_of_image.reshape(-1)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_of_image, feats)
    media_mean = media_sum / np.bincount(media_of_image)[:, None]
    templates, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(templates), feats.shape[1]))
    np.add.at(template_sum, template_of_media.reshape(-1), media_mean)
    zero = ~template_sum.any(axis=1)
    template_sum[zero] = 1.0  # normalised, then put back to zero
    pooled = l2_normalize(template_sum, "template features")
    pooled[zero] = 0.0
    return templates, pooled


def score_template_pairs(templates: np.ndarray, features: np.ndarray, pair_templates: np.ndarray,
                         chunk: int = 100_000) -> np.ndarray:
    """Cosine of each (t1, t2) row of `pair_templates`, given sorted template ids and normalized features."""
    rows = np.minimum(np.searchsorted(templates, pair_templates), len(templates) - 1)
    if not np.array_equal(templates[rows], pair_templates):
        raise ValueError("a template pair names a template id without features")
    scores = np.empty(len(pair_templates))
    for start in range(0, len(pair_templates), chunk):
        block = rows[start:start + chunk]
        scores[start:start + chunk] = np.sum(features[block[:, 0]] * features[block[:, 1]], axis=1)
    return scores


def pair_scores(embeddings: np.ndarray, detector_scores: np.ndarray, template_ids: np.ndarray,
                media_ids: np.ndarray, pair_templates: np.ndarray, mode: IJBMode) -> np.ndarray:
    """The protocol end to end: one cosine per pair, in pair-file order."""
    feats = image_features(embeddings, detector_scores, mode)
    templates, pooled = template_features(feats, template_ids, media_ids)
    return score_template_pairs(templates, pooled, pair_templates)


def tar_table(scores: np.ndarray, labels: np.ndarray) -> dict[float, float]:
    """TAR at each standard FAR 1e-6 .. 1e-1 as eval_ijbc.py reads it (the published tables' numbers)."""
    labels = np.asarray(labels)
    return tar_at_nearest_far(scores[labels == 1], scores[labels == 0], STANDARD_FARS)


def tar_table_at_most(scores: np.ndarray, labels: np.ndarray) -> dict[float, float | None]:
    """TAR at each standard FAR with an empirical FAR <= it (None where too few impostor pairs measure it)."""
    labels = np.asarray(labels)
    return tar_at_far(scores[labels == 1], scores[labels == 0], STANDARD_FARS)


def format_table(title: str, table: dict[float, float | None],
                 at_most: dict[float, float | None] | None = None) -> str:
    """A human-readable TAR@FAR table in percent, the way published IJB results are written; `at_most`
    adds the row of TARs reached at an empirical FAR <= each target."""
    def row(label: str, values: dict[float, float | None]) -> str:
        return label + "".join(f"{'n/a' if v is None else f'{100 * v:.2f}':>9}" for v in values.values())

    header = "FAR          " + "".join(f"{far:>9.0e}" for far in table)
    rows = [row("TAR%         ", table)] + ([row("TAR% strict  ", at_most)] if at_most else [])
    rule = "-" * len(header)
    legend = ["TAR%: the ROC point nearest each FAR, as eval_ijbc.py and the published tables read it; "
              "strict: the best TAR at an empirical FAR <= it"] if at_most else []
    return "\n".join([title, rule, header, *rows, rule, *legend])
