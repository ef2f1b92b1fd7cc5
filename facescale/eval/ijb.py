"""IJB-B/C style 1:1 template verification (media then template pooling), and a tiny synthetic IJB set writer.

Layout under `root` (IJB release layout, `name` = "ijbb" or "ijbc"):
    meta/<name>_face_tid_mid.txt          one image per line: `<image_name> <template_id> <media_id>`
    meta/<name>_template_pair_label.txt   one pair per line:  `<template_id_1> <template_id_2> <label 1|0>`
    loose_crop/<image_name>               the image files
This evaluator expects `loose_crop` images to be aligned crops of the training size already; the official
loose crops must first be aligned with their 5-point landmarks (`<name>_name_5pts_score.txt`, not read here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.eval.roc import STANDARD_FARS, tar_at_far
from facescale.eval.verification import l2_normalize

PNG_SIGNATURE = b"\x89PNG"


@dataclass
class IJBMeta:
    """Parsed IJB meta files: per-image template/media ids and the template pairs to score."""

    image_names: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    pair_templates: np.ndarray  # [P, 2]
    pair_labels: np.ndarray  # [P] 1 genuine, 0 impostor


def _read_int_table(path: str, columns: int, first_is_name: bool) -> tuple[list[str], np.ndarray]:
    names, rows = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != columns:
                raise ValueError(f"{path}:{number}: expected {columns} fields, got {len(tokens)}")
            try:
                rows.append([int(t) for t in tokens[1 if first_is_name else 0:]])
            except ValueError:
                raise ValueError(f"{path}:{number}: non-integer id in {line.strip()!r}") from None
            if first_is_name:
                names.append(tokens[0])
    if not rows:
        raise ValueError(f"{path}: empty")
    return names, np.asarray(rows, dtype=np.int64)


def read_ijb_meta(root: str, name: str = "ijbc") -> IJBMeta:
    """Read `meta/<name>_face_tid_mid.txt` and `meta/<name>_template_pair_label.txt` under `root`."""
    faces_path = os.path.join(root, "meta", f"{name}_face_tid_mid.txt")
    pairs_path = os.path.join(root, "meta", f"{name}_template_pair_label.txt")
    for path in (faces_path, pairs_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"IJB meta file {path} does not exist "
                                    "(see facescale.eval.ijb for the layout)")
    names, ids = _read_int_table(faces_path, 3, first_is_name=True)
    _, pairs = _read_int_table(pairs_path, 3, first_is_name=False)
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"{pairs_path}: labels must be 0 or 1")
    unknown = np.setdiff1d(pairs[:, :2], ids[:, 0])
    if unknown.size:
        raise ValueError(f"{pairs_path}: template ids {unknown[:5].tolist()} have no images in {faces_path}")
    return IJBMeta(names, ids[:, 0], ids[:, 1], pairs[:, :2], pairs[:, 2])


def template_features(image_features: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, L2-normalized template features): mean over a media's images, then over medias.

    normalize_images=False keeps image norms as a quality weight, as insightface's IJB script does.
    """
    feats = np.asarray(image_features, dtype=np.float64)
    if normalize_images:
        feats = l2_normalize(feats, "image features")
    keys = np.stack([np.asarray(template_ids), np.asarray(media_ids)], axis=1)
    media_keys, media_of_image = np.unique(keys, axis=0, return_inverse=True)
    media_of_image = media_of_image.reshape(-1)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_of_image, feats)
    media_mean = media_sum / np.bincount(media_of_image)[:, None]
    templates, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(templates), feats.shape[1]))
    np.add.at(template_sum, template_of_media, media_mean)
    template_mean = template_sum / np.bincount(template_of_media)[:, None]
    return templates, l2_normalize(template_mean, "template features")


def score_template_pairs(templates: np.ndarray, features: np.ndarray, pair_templates: np.ndarray,
                         chunk: int = 100_000) -> np.ndarray:
    """Cosine of each (t1, t2) row of `pair_templates`, given sorted template ids and normalized features."""
    rows = np.searchsorted(templates, pair_templates)
    rows = np.minimum(rows, len(templates) - 1)
    if not np.array_equal(templates[rows], pair_templates):
        raise ValueError("a template pair names a template id without features")
    scores = np.empty(len(pair_templates))
    for start in range(0, len(pair_templates), chunk):
        block = rows[start:start + chunk]
        scores[start:start + chunk] = np.sum(features[block[:, 0]] * features[block[:, 1]], axis=1)
    return scores


class _LazyFiles(Sequence):
    """Image bytes read on access, so a 500k-image IJB set is never held in memory at once."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _LazyFiles(self.paths[index])
        with open(self.paths[index], "rb") as handle:
            return handle.read()


def evaluate_ijb(model: nn.Module, root: str, name: str = "ijbc", batch_size: int = 128,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 image_size: int | None = 112, normalize_images: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """1:1 template verification on an IJB-layout directory: TAR@FAR 1e-6..1e-1 (None if unmeasurable),
    counts, and the raw pair `scores`/`labels` arrays (for `roc_figure`)."""
    from facescale.eval.extract import extract_embeddings

    meta = read_ijb_meta(root, name)
    paths = [os.path.join(root, "loose_crop", image) for image in meta.image_names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} IJB images are missing, e.g. {missing[0]}")
    embeddings = extract_embeddings(model, _LazyFiles(paths), batch_size, device, rank=rank,
                                    world_size=world_size, progress=progress, image_size=image_size,
                                    source=os.path.join(root, "loose_crop"))
    templates, features = template_features(embeddings, meta.template_ids, meta.media_ids, normalize_images)
    scores = score_template_pairs(templates, features, meta.pair_templates)
    genuine, impostor = scores[meta.pair_labels == 1], scores[meta.pair_labels == 0]
    report: dict[str, Any] = {"name": name, "num_images": len(paths), "num_templates": len(templates),
                              "num_genuine": int(genuine.size), "num_impostor": int(impostor.size)}
    for far, tar in tar_at_far(genuine, impostor, STANDARD_FARS).items():
        report[f"tar_at_far_{far:.0e}"] = tar
    report["scores"] = scores
    report["labels"] = meta.pair_labels
    return report


def write_synthetic_ijb(root: str, faces: Sequence[tuple[bytes, int]], name: str = "ijbc",
                        images_per_media: int = 2) -> dict[str, int]:
    """Write a tiny IJB-layout set (see module docstring) from (encoded image, identity) items.

    Each identity's images are split in order into two templates (one if it has a single image), each template
    into medias of `images_per_media` consecutive images. Pairs: the two templates of every identity (label 1)
    and the first templates of every two identities (label 0).
    """
    by_identity: dict[int, list[int]] = {}
    for index, (_, identity) in enumerate(faces):
        by_identity.setdefault(int(identity), []).append(index)
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    face_lines, templates_of = [], {}
    next_template, next_media = 1, 1
    for identity, indices in sorted(by_identity.items()):
        half = (len(indices) + 1) // 2
        groups = [indices[:half], indices[half:]] if len(indices) > 1 else [indices]
        templates_of[identity] = []
        for group in groups:
            for offset, index in enumerate(group):
                if offset % images_per_media == 0 and offset:
                    next_media += 1
                data = faces[index][0]
                extension = "png" if data.startswith(PNG_SIGNATURE) else "jpg"
                image_name = f"{index}.{extension}"
                with open(os.path.join(root, "loose_crop", image_name), "wb") as handle:
                    handle.write(data)
                face_lines.append(f"{image_name} {next_template} {next_media}")
            templates_of[identity].append(next_template)
            next_template, next_media = next_template + 1, next_media + 1
    pair_lines = [f"{t[0]} {t[1]} 1" for t in templates_of.values() if len(t) == 2]
    identities = sorted(templates_of)
    pair_lines += [f"{templates_of[a][0]} {templates_of[b][0]} 0"
                   for i, a in enumerate(identities) for b in identities[i + 1:]]
    with open(os.path.join(root, "meta", f"{name}_face_tid_mid.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(face_lines) + "\n")
    with open(os.path.join(root, "meta", f"{name}_template_pair_label.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(pair_lines) + "\n")
    return {"images": len(face_lines), "templates": next_template - 1, "pairs": len(pair_lines)}
