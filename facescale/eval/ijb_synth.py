"""A small IJB release written from aligned faces: each loose crop is its face warped by a known random
similarity transform onto a larger canvas, listed with the 5 landmarks that transform implies and a score.

The warp is rendered with torch's grid_sample, independently of facescale.eval.align, so aligning a loose crop
back and comparing it with its source face checks the alignment code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from facescale.eval.align import arcface_template


@dataclass
class SyntheticIJB:
    """What was written: counts, and per face its aligned->loose transform [2, 3] and detector score."""

    images: int
    templates: int
    pairs: int
    transforms: np.ndarray
    detector_scores: np.ndarray


def _random_similarity(rng: np.random.Generator, size: int, scale_range: tuple[float, float],
                       max_rotation_deg: float) -> tuple[np.ndarray, tuple[int, int]]:
    """(aligned -> loose matrix [2, 3], loose canvas (width, height)) with a random margin around the face."""
    scale = rng.uniform(*scale_range)
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float64)
    moved = corners @ linear.T
    margin = rng.uniform(0.1, 0.4, size=2) * size * scale
    offset = margin - moved.min(axis=0) + rng.uniform(0, 1, size=2)
    extent = moved.max(axis=0) - moved.min(axis=0) + 2 * margin + 1
    matrix = np.concatenate([linear, offset[:, None]], axis=1)
    return matrix, (int(np.ceil(extent[0])) + 1, int(np.ceil(extent[1])) + 1)


def _render_loose(face: np.ndarray, matrix: np.ndarray, canvas: tuple[int, int],
                  background: np.ndarray) -> np.ndarray:
    """The loose crop: every canvas pixel samples the face (bilinear) where the inverse transform lands."""
    size = face.shape[0]
    width, height = canvas
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    vs, us = np.mgrid[0:height, 0:width].astype(np.float64)
    px = inverse[0, 0] * us + inverse[0, 1] * vs + inverse[0, 2]
    py = inverse[1, 0] * us + inverse[1, 1] * vs + inverse[1, 2]
    grid = torch.from_numpy(np.stack([2 * px / (size - 1) - 1, 2 * py / (size - 1) - 1], axis=-1))[None]
    source = torch.from_numpy(face.astype(np.float64)).permute(2, 0, 1)[None]
    sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    inside = F.grid_sample(torch.ones_like(source[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    pixels = sampled[0].permute(1, 2, 0).numpy() + (1 - inside[0, 0].numpy())[..., None] * background
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format == "JPEG" else {}
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def write_synthetic_ijb_release(root: str, faces: Sequence[np.ndarray], identities: Sequence[int],
                                name: str = "ijbc", images_per_media: int = 2, seed: int = 0,
                                scale_range: tuple[float, float] = (1.3, 2.0), max_rotation_deg: float = 30.0,
                                image_format: str = "PNG") -> SyntheticIJB:
    """Write `root`/meta/*.txt and `root`/loose_crop/ from aligned square HWC uint8 `faces`.

    Each identity's faces are split in order into two templates (one if it has a single face), each template
    into medias of `images_per_media` consecutive faces. Pairs: the two templates of every identity (label 1)
    and the first templates of every two identities (label 0).
    """
    if len(faces) != len(identities) or not len(faces):
        raise ValueError(f"need one identity per face, got {len(faces)} faces and {len(identities)} ids")
    rng = np.random.default_rng(seed)
    size = faces[0].shape[0]
    template = arcface_template(size)
    extension = "png" if image_format == "PNG" else "jpg"
    by_identity: dict[int, list[int]] = {}
    for index, identity in enumerate(identities):
        by_identity.setdefault(int(identity), []).append(index)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    transforms, scores = np.zeros((len(faces), 2, 3)), rng.uniform(0.5, 1.0, len(faces)).round(6)
    face_lines, point_lines, templates_of = [], [], {}
    next_template, next_media = 1, 1
    for identity, indices in sorted(by_identity.items()):
        half = (len(indices) + 1) // 2
        groups = [indices[:half], indices[half:]] if len(indices) > 1 else [indices]
        templates_of[identity] = []
        for group in groups:
            for offset, index in enumerate(group):
                if offset % images_per_media == 0 and offset:
                    next_media += 1
                matrix, canvas = _random_similarity(rng, size, scale_range, max_rotation_deg)
                transforms[index] = matrix
                loose = _render_loose(faces[index], matrix, canvas, rng.uniform(0, 255, 3))
                image_name = f"{index + 1}.{extension}"
                with open(os.path.join(root, "loose_crop", image_name), "wb") as handle:
                    handle.write(_encode(loose, image_format))
                points = template @ matrix[:, :2].T + matrix[:, 2]
                face_lines.append(f"{image_name} {next_template} {next_media}")
                point_lines.append(f"{image_name} " + " ".join(f"{v:.4f}" for v in points.reshape(-1))
                                   + f" {scores[index]:.6f}")
            templates_of[identity].append(next_template)
            next_template, next_media = next_template + 1, next_media + 1
    pair_lines = [f"{t[0]} {t[1]} 1" for t in templates_of.values() if len(t) == 2]
    ids = sorted(templates_of)
    pair_lines += [f"{templates_of[a][0]} {templates_of[b][0]} 0"
                   for i, a in enumerate(ids) for b in ids[i + 1:]]
    for kind, lines in (("face_tid_mid", face_lines), ("template_pair_label", pair_lines),
                        ("name_5pts_score", point_lines)):
        with open(os.path.join(root, "meta", f"{name}_{kind}.txt"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return SyntheticIJB(len(face_lines), next_template - 1, len(pair_lines), transforms, scores)
