"""5-point face alignment: a least-squares similarity transform onto the ArcFace template, bilinear warp.

Coordinates are pixel indices (x right, y down, pixel centres at integers), the convention of the IJB
landmark files and of the ArcFace template; pixels sampled outside the source image are black.
"""

from __future__ import annotations

import numpy as np

# Left eye, right eye, nose tip, left and right mouth corners in a 112x112 aligned crop (ArcFace template).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The 5-point template for a square crop of `image_size`: scaled from 112, or from the 128-wide
    variant (112 plus an 8-pixel left margin) when the size is not a multiple of 112, as arcface does."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for 5-point alignment, got {image_size}")
    if image_size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (image_size / 112.0)
    ratio = image_size / 128.0
    template = ARCFACE_TEMPLATE_112 * ratio
    template[:, 0] += 8.0 * ratio
    return template


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix [sR | t] minimising sum |sR p + t - q|^2 over point pairs (p, q) (Umeyama, 1991)."""
    src = np.asarray(source, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("the source landmarks coincide; cannot estimate a similarity transform")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection would fit better; similarity forbids it
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / src_var)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp HWC uint8 `image` by the 2x3 `matrix` (source -> output coordinates) into `size` = (w, h)."""
    width, height = size
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(src_x).astype(np.int64), np.floor(src_y).astype(np.int64)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))  # a black border: outside pixels read as 0
    rows, cols = image.shape[0] + 1, image.shape[1] + 1

    def tap(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return padded[np.clip(y + 1, 0, rows), np.clip(x + 1, 0, cols)].astype(np.float64)

    out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
           + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The `image_size` square crop of HWC uint8 `image` whose 5 `landmarks` land on the ArcFace template."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"expected 5 finite (x, y) landmarks, got {np.asarray(landmarks).tolist()}")
    matrix = similarity_transform(points, arcface_template(image_size))
    return warp_affine(image, matrix, (image_size, image_size))
