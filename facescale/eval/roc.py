"""TAR@FAR and ROC curves from genuine/impostor similarity scores, plus a ROC image for TensorBoard.

Scores are similarities (higher = more alike, e.g. cosine). `tar_at_far` accepts a pair when its score is
strictly above the threshold, so every TAR it reports is achieved at an empirical FAR <= the target;
`tar_at_nearest_far` reads the ROC as insightface's eval_ijbc.py does, the numbers of published IJB tables.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

STANDARD_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _as_scores(values: np.ndarray | Sequence[float], what: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    if scores.size and not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} scores contain NaN or inf; check the embeddings that produced them")
    return scores


def far_is_resolvable(far: float, num_impostors: int) -> bool:
    """True when `num_impostors` pairs can measure FAR `far`: at least one false accept must be allowed."""
    return num_impostors > 0 and far * num_impostors >= 1.0 - 1e-9


def tar_at_far(genuine: np.ndarray | Sequence[float], impostor: np.ndarray | Sequence[float],
               fars: Sequence[float] = STANDARD_FARS) -> dict[float, float | None]:
    """Best TAR whose empirical FAR is <= each target; None where there are too few impostors for that FAR.

    With k = floor(far * n_impostors) false accepts allowed, the threshold is the (k+1)-th highest impostor
    score and a pair is accepted when its score is strictly above it (any lower threshold would exceed k).
    """
    gen = _as_scores(genuine, "genuine")
    imp = np.sort(_as_scores(impostor, "impostor"))[::-1]
    if gen.size == 0:
        raise ValueError("tar_at_far needs at least one genuine score")
    result: dict[float, float | None] = {}
    for far in fars:
        if not 0.0 < far < 1.0:
            raise ValueError(f"FAR targets must lie in (0, 1), got {far}")
        if not far_is_resolvable(far, imp.size):
            result[far] = None
            continue
        allowed = min(int(math.floor(far * imp.size + 1e-9)), imp.size - 1)
        threshold = imp[allowed]
        result[far] = float(np.mean(gen > threshold))
    return result


def tar_at_nearest_far(genuine: np.ndarray | Sequence[float], impostor: np.ndarray | Sequence[float],
                       fars: Sequence[float] = STANDARD_FARS) -> dict[float, float]:
    """TAR at each FAR as insightface's eval_ijbc.py reads it, the rule of the published IJB tables: the
    vertex of the ROC (scikit-learn's roc_curve: accept at score >= each distinct score, points on straight
    runs dropped, (0, 0) first) whose FAR is nearest the target, the highest TAR among equally near ones. That
    point may lie above the target (IJB-C at 1e-6: 16 false accepts of 15.6M rather than 15), and it exists
    below one false accept (the FAR 0 vertex)."""
    gen, imp = _as_scores(genuine, "genuine"), _as_scores(impostor, "impostor")
    if gen.size == 0 or imp.size == 0:
        raise ValueError("tar_at_nearest_far needs both genuine and impostor scores")
    scores = np.concatenate([gen, imp])
    order = np.argsort(scores, kind="stable")[::-1]
    is_genuine = (np.arange(scores.size) < gen.size)[order]
    last_of_score = np.r_[np.flatnonzero(np.diff(scores[order])), scores.size - 1]  # per distinct score
    accepted_genuine = np.cumsum(is_genuine)[last_of_score]
    accepted_impostor = last_of_score + 1 - accepted_genuine
    if len(last_of_score) > 2:  # keep the ends and every point where the curve changes direction
        turns = np.diff(accepted_impostor, 2) != 0
        turns |= np.diff(accepted_genuine, 2) != 0
        keep = np.r_[True, turns, True]
        accepted_genuine, accepted_impostor = accepted_genuine[keep], accepted_impostor[keep]
    tar = np.r_[0, accepted_genuine] / gen.size
    far_points = np.r_[0, accepted_impostor] / imp.size
    result: dict[float, float] = {}
    for far in fars:
        distance = np.abs(far_points - far)
        result[far] = float(tar[np.flatnonzero(distance == distance.min())[-1]])
    return result


def roc_curve(genuine: np.ndarray | Sequence[float],
              impostor: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) for every distinct score used as threshold (accept when score >= threshold)."""
    gen = _as_scores(genuine, "genuine")
    imp = _as_scores(impostor, "impostor")
    if gen.size == 0 or imp.size == 0:
        raise ValueError("roc_curve needs both genuine and impostor scores")
    thresholds = np.unique(np.concatenate([gen, imp]))[::-1]
    gen_sorted = np.sort(gen)
    imp_sorted = np.sort(imp)
    tar = (gen.size - np.searchsorted(gen_sorted, thresholds, side="left")) / gen.size
    far = (imp.size - np.searchsorted(imp_sorted, thresholds, side="left")) / imp.size
    return far, tar, thresholds


def _decimate(far: np.ndarray, tar: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~max_points curve points, spread evenly in log FAR (IJB-C has millions of thresholds)."""
    if far.size <= max_points:
        return far, tar
    targets = np.logspace(-8, 0, max_points)
    keep = np.unique(np.clip(np.searchsorted(far, targets, side="right") - 1, 0, far.size - 1))
    return far[keep], tar[keep]


def _render_matplotlib(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
                       size: tuple[int, int]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from PIL import Image

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1.0
    for label, (far, tar) in curves.items():
        positive = far > 0
        ax.plot(far[positive], tar[positive], label=label)
        if positive.any():
            floor = min(floor, float(far[positive].min()))
    ax.set_xscale("log")
    ax.set_xlim(max(min(floor, 0.1), 1e-6), 1.0)  # at least a decade: a tiny set may reach no FAR below 1
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)


def _render_pil(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str,
                size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    width, height = size
    margin = 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 10), f"{title} (x: log10 FAR 1e-6..1, y: TAR 0..1)", fill="black")
    colors = ["blue", "red", "green", "orange", "purple", "brown"]
    for index, (label, (far, tar)) in enumerate(curves.items()):
        positive = far > 0
        log_far = np.clip(np.log10(far[positive]), -6.0, 0.0)
        xs = margin + (log_far + 6.0) / 6.0 * (width - 2 * margin)
        ys = height - margin - tar[positive] * (height - 2 * margin)
        points = list(zip(xs.tolist(), ys.tolist(), strict=True))
        color = colors[index % len(colors)]
        if len(points) >= 2:
            draw.line(points, fill=color, width=2)
        draw.text((width - margin - 150, height - margin - 15 * (index + 1)), label, fill=color)
    return np.asarray(image, dtype=np.uint8)


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC",
               size: tuple[int, int] = (640, 480), backend: str = "auto") -> np.ndarray:
    """Draw ROC curves (label -> (genuine, impostor) scores) as an HWC uint8 RGB image for `add_image`.

    backend: "matplotlib", "pil" (plain lines, no extra dependency) or "auto" (matplotlib if importable).
    """
    if not curves:
        raise ValueError("roc_figure needs at least one (genuine, impostor) curve")
    points = {}
    for label, (genuine, impostor) in curves.items():
        far, tar, _ = roc_curve(genuine, impostor)
        points[label] = _decimate(far, tar)
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401
            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    if backend == "matplotlib":
        return _render_matplotlib(points, title, size)
    if backend == "pil":
        return _render_pil(points, title, size)
    raise ValueError(f"unknown ROC backend {backend!r}; use 'auto', 'matplotlib' or 'pil'")
