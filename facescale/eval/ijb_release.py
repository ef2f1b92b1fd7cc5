"""Reader of the IJB-B / IJB-C release layout (as distributed with insightface's IJB package).

Under `root` (e.g. `IJBC/`), with `name` = "ijbb" or "ijbc":
    meta/<name>_face_tid_mid.txt          `<image_name> <template_id> <media_id>` per face
    meta/<name>_template_pair_label.txt   `<template_id_1> <template_id_2> <label 1|0>` per pair
    meta/<name>_name_5pts_score.txt       `<image_name> x1 y1 ... x5 y5 <detector_score>` per face
    loose_crop/<image_name>               the loosely cropped face images
Landmarks are left eye, right eye, nose, left and right mouth corner in loose-crop pixel coordinates.
Every malformed line is reported with its file and line number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from facescale.errors import InputError

NAMES = ("ijbb", "ijbc")
INT64 = np.iinfo(np.int64)  # template and media ids, labels: what the arrays hold


class IJBReleaseError(InputError, ValueError):
    """A malformed IJB release file; the message names the file and line."""

    default_fix = "re-extract the IJB release (meta/ and loose_crop/) and pass its directory"


class IJBReleaseFileError(IJBReleaseError, FileNotFoundError):
    """A file the IJB release should hold is missing."""


@dataclass
class IJBRelease:
    """One IJB set: per-face file, template, media, landmarks, detector score; and the pairs to score."""

    root: str
    name: str
    image_names: list[str]
    template_ids: np.ndarray  # [N] int64
    media_ids: np.ndarray  # [N] int64
    landmarks: np.ndarray  # [N, 5, 2] float64
    detector_scores: np.ndarray  # [N] float64
    pair_templates: np.ndarray  # [P, 2] int64
    pair_labels: np.ndarray  # [P] int64, 1 genuine, 0 impostor

    def image_path(self, index: int) -> str:
        return os.path.join(self.root, "loose_crop", self.image_names[index])


def meta_path(root: str, name: str, kind: str) -> str:
    return os.path.join(root, "meta", f"{name}_{kind}.txt")


def detect_name(root: str) -> str:
    """"ijbb" or "ijbc", whichever has a face file under `root`/meta (an error if neither or both)."""
    found = [n for n in NAMES if os.path.isfile(meta_path(root, n, "face_tid_mid"))]
    if len(found) != 1:
        what = "both ijbb and ijbc" if found else "no <name>_face_tid_mid.txt"
        below = [] if found else _releases_below(root)
        fix = (f"pass --root {' or '.join(below)} (the release directory itself)" if below else
               "pass --name ijbb|ijbc and --root the release directory that holds meta/ and loose_crop/")
        raise IJBReleaseFileError(f"{os.path.join(root, 'meta')}: {what} meta files; {fix}")
    return found[0]


def _releases_below(root: str) -> list[str]:
    """Subdirectories of `root` that are releases (e.g. IJB_release/IJBC, where --root named the parent)."""
    if not os.path.isdir(root):
        return []
    children = sorted(os.path.join(root, child) for child in os.listdir(root))
    return [child for child in children
            if any(os.path.isfile(meta_path(child, n, "face_tid_mid")) for n in NAMES)]


def _lines(path: str) -> list[tuple[int, list[str]]]:
    if not os.path.isfile(path):
        raise IJBReleaseFileError(f"{path}: IJB meta file not found; --root must be the release directory "
                                "holding meta/ and loose_crop/ (see facescale.eval.ijb_release)")
    with open(path, "rb") as handle:
        rows = [(number, _text(path, number, line).split()) for number, line in enumerate(handle, start=1)]
    rows = [(number, tokens) for number, tokens in rows if tokens]
    if not rows:
        raise IJBReleaseError(f"{path}: empty; re-extract the IJB meta files")
    return rows


def _text(path: str, number: int, line: bytes) -> str:
    """One line of a meta file as text (the release's files are ASCII, so UTF-8 reads them)."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise IJBReleaseError(f"{path}:{number}: not UTF-8 text; fix or re-extract the file") from None


def _ints(path: str, number: int, tokens: list[str], expected: int, layout: str) -> list[int]:
    if len(tokens) != expected:
        raise IJBReleaseError(f"{path}:{number}: expected {expected} fields ({layout}), got {len(tokens)}; "
                         "fix or re-extract the file")
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        raise IJBReleaseError(f"{path}:{number}: non-integer field in {' '.join(tokens)!r} ({layout})"
                              ) from None
    if not all(INT64.min <= value <= INT64.max for value in values):
        raise IJBReleaseError(f"{path}:{number}: a field of {' '.join(tokens)!r} is beyond 64-bit integers "
                              f"({layout}); fix or re-extract the file")
    return values


def _image_name(path: str, number: int, name: str) -> str:
    """An image name of the face file: a path inside loose_crop/ (absolute or `..` names would leave it)."""
    if os.path.isabs(name) or ".." in name.split("/"):
        raise IJBReleaseError(f"{path}:{number}: image name {name!r} is absolute or has '..': names are "
                              "paths inside loose_crop/; fix or re-extract the file")
    return name


def _read_faces(path: str) -> tuple[list[str], np.ndarray]:
    names, ids = [], []
    for number, tokens in _lines(path):
        ids.append(_ints(path, number, tokens[1:], 2, "image_name template_id media_id"))
        names.append(_image_name(path, number, tokens[0]))
    return names, np.asarray(ids, dtype=np.int64).reshape(-1, 2)


def _read_pairs(path: str) -> np.ndarray:
    """[P, 3] pairs; a fast whole-file parse (IJB-C has 15.7M pairs), per line only to name a bad line."""
    layout = "template_id_1 template_id_2 label"
    if not os.path.isfile(path):
        _lines(path)  # raises the not-found message
    try:  # numpy's C parser: seconds for IJB-C, without a Python object per number
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        table = table if table.shape[1:] == (3,) and len(table) else None
    except (ValueError, OverflowError):  # also a non-UTF-8 file (UnicodeDecodeError is a ValueError)
        table = None
    if table is None:  # something is malformed: find and name the line
        table = np.asarray([_ints(path, number, tokens, 3, layout) for number, tokens in _lines(path)],
                           dtype=np.int64)
    bad = np.flatnonzero(~np.isin(table[:, 2], (0, 1)))
    if bad.size:
        raise IJBReleaseError(f"{path}: pair {bad[0] + 1} (non-empty line) has label {table[bad[0], 2]}; "
                         "labels are 1 (same subject) or 0 (different)")
    return table


def _read_landmarks(path: str) -> dict[str, tuple[int, np.ndarray, float]]:
    """image name -> (line number, [5, 2] landmarks, detector score)."""
    layout = "image_name x1 y1 ... x5 y5 detector_score"
    found: dict[str, tuple[int, np.ndarray, float]] = {}
    for number, tokens in _lines(path):
        if len(tokens) != 12:
            raise IJBReleaseError(f"{path}:{number}: expected 12 fields ({layout}), got {len(tokens)}; "
                             "fix or re-extract the file")
        try:
            values = np.asarray([float(t) for t in tokens[1:]])
        except ValueError:
            raise IJBReleaseError(f"{path}:{number}: non-numeric field in {' '.join(tokens)!r} "
                             f"({layout})") from None
        if not np.all(np.isfinite(values)):
            raise IJBReleaseError(f"{path}:{number}: non-finite landmark or score ({layout})")
        if tokens[0] in found:
            raise IJBReleaseError(f"{path}:{number}: image {tokens[0]} already listed on line "
                             f"{found[tokens[0]][0]}; each face has one landmark line")
        found[tokens[0]] = (number, values[:10].reshape(5, 2), float(values[10]))
    return found


def read_ijb_release(root: str, name: str | None = None) -> IJBRelease:
    """Read and cross-check the three meta files of an IJB release under `root` (`name` detected if None)."""
    name = detect_name(root) if name is None else name.lower()
    faces_path = meta_path(root, name, "face_tid_mid")
    pairs_path = meta_path(root, name, "template_pair_label")
    points_path = meta_path(root, name, "name_5pts_score")
    names, ids = _read_faces(faces_path)
    pairs = _read_pairs(pairs_path)
    points = _read_landmarks(points_path)
    landmarks, scores = np.empty((len(names), 5, 2)), np.empty(len(names))
    for index, image in enumerate(names):
        if image not in points:
            raise IJBReleaseError(f"{points_path}: no landmark line for image {image} (line {index + 1} of "
                             f"{faces_path}); use the 5-point file of the same release")
        _, landmarks[index], scores[index] = points[image]
    unknown = np.setdiff1d(pairs[:, :2], ids[:, 0])
    if unknown.size:
        line = int(np.flatnonzero(np.isin(pairs[:, :2], unknown).any(axis=1))[0]) + 1
        raise IJBReleaseError(f"{pairs_path}:{line}: template ids {unknown[:5].tolist()} have no faces in "
                         f"{faces_path}; use meta files of the same release")
    return IJBRelease(root, name, names, ids[:, 0], ids[:, 1], landmarks, scores, pairs[:, :2], pairs[:, 2])


def check_images_exist(release: IJBRelease) -> None:
    """All loose crops present, else one error naming the count and the first missing file."""
    missing = [i for i in range(len(release.image_names)) if not os.path.isfile(release.image_path(i))]
    if missing:
        raise IJBReleaseFileError(f"{release.image_path(missing[0])}: missing ({len(missing)} of "
                                f"{len(release.image_names)} loose crops listed in "
                                f"{meta_path(release.root, release.name, 'face_tid_mid')} are missing); "
                                "extract loose_crop/ of the release under --root")
