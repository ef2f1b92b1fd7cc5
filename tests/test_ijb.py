"""IJB-B/C on the release layout: alignment recovers known transforms, the protocol equals a brute-force
float64 computation for every F1/N1/D1 mode, 2 ranks equal 1 rank, and bad meta lines are named."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

from facescale.data.synth_faces import render_identity
from facescale.eval.align import ARCFACE_TEMPLATE_112, align_face, arcface_template, similarity_transform
from facescale.eval.extract import decode_image
from facescale.eval.ijb import evaluate_ijb, table_text, write_outputs
from facescale.eval.ijb_protocol import IJBMode
from facescale.eval.ijb_release import IJBReleaseError, read_ijb_release
from facescale.eval.ijb_synth import write_synthetic_ijb_release
from tests.distributed import run_ranks

SIZE = 112
IDENTITIES, PER_IDENTITY = 16, 3  # 16 genuine and 120 impostor template pairs


def _faces(identities: int, per_identity: int, seed: int = 5) -> tuple[list[np.ndarray], list[int]]:
    """Synthetic faces, slightly blurred: photographs are smooth at the pixel scale, while the synthetic faces
    carry per-pixel sensor noise that no pair of resamplings (loose crop and back) can keep."""
    faces, ids = [], []
    for identity in range(identities):
        for face in render_identity(seed, identity, per_identity, SIZE):
            faces.append(np.asarray(Image.fromarray(face).filter(ImageFilter.GaussianBlur(1.0))))
            ids.append(identity)
    return faces, ids


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[str, list[np.ndarray]]:
    root = str(tmp_path_factory.mktemp("ijb") / "IJBC")
    faces, ids = _faces(IDENTITIES, PER_IDENTITY)
    written = write_synthetic_ijb_release(root, faces, ids, name="ijbc", images_per_media=2, seed=1)
    assert (written.images, written.templates, written.pairs) == (48, 32, 16 + 120)
    return root, faces


def _loose(root: str, index: int) -> np.ndarray:
    meta = read_ijb_release(root)
    with open(meta.image_path(index), "rb") as handle:
        return decode_image(handle.read(), None, meta.image_path(index))


def test_template_and_similarity_fit() -> None:
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(arcface_template(128), ARCFACE_TEMPLATE_112 + [8.0, 0.0])  # 112 + 8-px margin
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.7, 1.8, np.array([-13.0, 41.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = scale * points @ rotation.T + shift
    np.testing.assert_allclose(similarity_transform(points, moved),
                               np.concatenate([scale * rotation, shift[:, None]], axis=1), atol=1e-9)
    mirrored = points * [-1.0, 1.0]  # a reflection is not a similarity: the fit must not reproduce it
    fit = similarity_transform(points, mirrored)
    assert np.linalg.det(fit[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), moved)


def test_alignment_recovers_the_aligned_face(release) -> None:
    root, faces = release
    meta = read_ijb_release(root)
    inner = (slice(8, -8), slice(8, -8))  # away from the border, where the canvas background bleeds in
    for index in range(0, len(faces), 5):
        loose = _loose(root, index)
        assert loose.shape[0] > 1.3 * SIZE and loose.shape[1] > 1.3 * SIZE  # really a loose crop
        aligned = align_face(loose, meta.landmarks[index], SIZE).astype(float)
        error = np.abs(aligned - faces[index])[inner].mean()
        shifted = align_face(loose, meta.landmarks[index] + [1.5, -1.5], SIZE).astype(float)
        assert error < 1.5, f"face {index}: mean abs error {error:.2f} (of 255)"
        assert np.abs(shifted - faces[index])[inner].mean() > 3 * error  # a 1.5-px slip is far worse


class RandomProjection(nn.Module):
    """A fixed random linear embedding of the pixels: identity structure carries through, exact in float64."""

    def __init__(self, dim: int = 24, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, 3 * SIZE * SIZE, generator=generator) / SIZE)
        self.bias = nn.Parameter(torch.randn(dim, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def eval_ijbc_tar(genuine: list[float], impostor: list[float], far: float) -> float:
    """TAR at `far` the way insightface's eval_ijbc.py reads it, in plain loops: scikit-learn's roc_curve
    (one point per distinct score, accepting scores >= it; a point dropped when the step into it equals the
    step out of it; (0, 0) first), then the point nearest `far`, the last of equally near ones."""
    points = []
    for threshold in sorted(set(genuine) | set(impostor), reverse=True):
        points.append((sum(i >= threshold for i in impostor), sum(g >= threshold for g in genuine)))
    kept = [p for k, p in enumerate(points) if k in (0, len(points) - 1) or len(points) <= 2
            or (p[0] - points[k - 1][0], p[1] - points[k - 1][1]) !=
            (points[k + 1][0] - p[0], points[k + 1][1] - p[1])]
    curve = [(0.0, 0.0)] + [(fp / len(impostor), tp / len(genuine)) for fp, tp in kept]
    nearest = min(abs(x - far) for x, _ in curve)
    return [y for x, y in curve if abs(x - far) == nearest][-1]


def _reference_report(root: str, mode: IJBMode) -> tuple[np.ndarray, dict[float, float | None], dict]:
    """The protocol in plain float64 loops, from faces aligned one at a time (alignment is tested above)."""
    meta = read_ijb_release(root)
    model = RandomProjection()
    weight, bias = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    features = {}
    for index in range(len(meta.image_names)):
        pixels = align_face(_loose(root, index), meta.landmarks[index], SIZE).astype(np.float64)
        chw = (pixels.transpose(2, 0, 1) - 127.5) / 127.5
        feature = weight @ chw.reshape(-1) + bias
        if mode.flip:
            feature = feature + weight @ chw[:, :, ::-1].reshape(-1) + bias
        if not mode.norm_score:
            feature = feature / math.sqrt(sum(v * v for v in feature))
        if mode.detector_score:
            feature = feature * meta.detector_scores[index]
        features[index] = feature
    templates = {}
    for template in set(meta.template_ids.tolist()):
        medias: dict[int, list[np.ndarray]] = {}
        for index in range(len(features)):
            if meta.template_ids[index] == template:
                medias.setdefault(int(meta.media_ids[index]), []).append(features[index])
        pooled = sum(sum(images) / len(images) for images in medias.values())
        templates[template] = pooled / math.sqrt(float(pooled @ pooled))
    scores = np.array([float(templates[a] @ templates[b]) for a, b in meta.pair_templates.tolist()])
    genuine = [s for s, label in zip(scores, meta.pair_labels, strict=True) if label == 1]
    impostor = [s for s, label in zip(scores, meta.pair_labels, strict=True) if label == 0]
    table: dict[float, float | None] = {}
    for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        if far * len(impostor) < 1:
            table[far] = None
            continue
        # best TAR over every threshold (accept above it) whose false accepts stay within far * impostors
        table[far] = max(sum(g > t for g in genuine) / len(genuine) for t in impostor + [max(genuine)]
                         if sum(i > t for i in impostor) <= far * len(impostor))
    nearest = {far: eval_ijbc_tar(genuine, impostor, far) for far in table}
    return scores, table, nearest


@pytest.mark.parametrize("flip,norm_score,detector_score", list(itertools.product([True, False], repeat=3)))
def test_protocol_equals_brute_force(release, flip, norm_score, detector_score) -> None:
    root, _ = release
    mode = IJBMode(flip, norm_score, detector_score)
    report = evaluate_ijb(RandomProjection(), root, mode=mode, batch_size=7, image_size=SIZE, progress=False)
    scores, table, nearest = _reference_report(root, mode)
    np.testing.assert_allclose(report["scores"], scores, atol=2e-6)
    got = {float(k.removeprefix("tar_at_far_at_most_")): v for k, v in report.items()
           if k.startswith("tar_at_far_at_most_")}
    assert got == table
    got = {float(k.removeprefix("tar_at_far_")): v for k, v in report.items()
           if k.startswith("tar_at_far_") and not k.startswith("tar_at_far_at_most")}
    assert got == nearest
    assert report["mode"] == mode.label and report["num_impostor"] == 120
    assert table[1e-2] is not None and 0.0 < table[1e-1] < 1.0  # non-trivial: the modes can disagree


def test_modes_change_the_scores(release) -> None:
    root, _ = release
    modes = (IJBMode(), IJBMode(flip=False), IJBMode(norm_score=False), IJBMode(detector_score=False))
    runs = {mode: evaluate_ijb(RandomProjection(), root, mode=mode, image_size=SIZE, progress=False)["scores"]
            for mode in modes}
    reference = runs.pop(IJBMode())
    for mode, scores in runs.items():
        assert np.abs(scores - reference).max() > 1e-3, f"{mode.label} had no effect"


def _evaluate_on_rank(rank: int, world: int, root: str) -> dict:
    return evaluate_ijb(RandomProjection(), root, batch_size=5, rank=rank, world_size=world,
                        image_size=SIZE, workers=1, progress=False)


@pytest.mark.slow
def test_two_ranks_with_workers_equal_one_rank(release, tmp_path) -> None:
    root, _ = release
    rank0, rank1 = run_ranks(_evaluate_on_rank, 2, root)
    single = evaluate_ijb(RandomProjection(), root, batch_size=16, image_size=SIZE, progress=False)
    for report in (rank0, rank1):
        np.testing.assert_allclose(report["scores"], single["scores"], atol=1e-6)
        assert {k: v for k, v in report.items() if k.startswith("tar")} == \
               {k: v for k, v in single.items() if k.startswith("tar")}
    paths = write_outputs(single, str(tmp_path / "out"))
    np.testing.assert_array_equal(np.load(paths["scores"]), single["scores"])
    assert paths["roc_image"].endswith("ijbc_F1N1D1_roc.png")
    text = table_text(single)
    assert "F1 N1 D1" in text and "n/a" in text and "1e-06" in text


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def test_bad_meta_lines_are_named(tmp_path) -> None:
    root = str(tmp_path / "IJBB")
    faces, ids = _faces(2, 2)
    write_synthetic_ijb_release(root, faces, ids, name="ijbb")
    points = f"{root}/meta/ijbb_name_5pts_score.txt"
    good = open(points, encoding="utf-8").read()
    lines = good.splitlines()
    _write(points, "\n".join(lines[:2] + [lines[2].rsplit(" ", 1)[0]] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"ijbb_name_5pts_score\.txt:3: expected 12 fields"):
        read_ijb_release(root)
    _write(points, "\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match=r"no landmark line for image 4\.png \(line 4 of .*face_tid_mid"):
        read_ijb_release(root, "ijbb")
    _write(points, good)
    pairs = f"{root}/meta/ijbb_template_pair_label.txt"
    _write(pairs, open(pairs, encoding="utf-8").read() + "1 99 0\n")
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label\.txt:4: template ids \[99\]"):
        read_ijb_release(root)
    _write(pairs, "1 2 1\n1 x 0\n")
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label\.txt:2: non-integer"):
        read_ijb_release(root)
    with pytest.raises(IJBReleaseError, match=r"ijbc_face_tid_mid\.txt: IJB meta file not found"):
        read_ijb_release(root, "ijbc")
    # --root one level too high (insightface's IJB_release/ holds IJBB/ and IJBC/): the release is named
    with pytest.raises(IJBReleaseError, match=r"_face_tid_mid.txt meta files; pass --root \S+/IJBB "):
        read_ijb_release(str(tmp_path))


@pytest.mark.parametrize(("kind", "damage", "message"), [
    ("face_tid_mid", lambda text: b"\xff\xfe" + text.encode(), r"face_tid_mid\.txt:1: not UTF-8 text"),
    ("template_pair_label", lambda text: (text + "100000000000000000000000 1 1\n").encode(),
     r"template_pair_label\.txt:4: a field of '100000000000000000000000 1 1' is beyond 64-bit integers"),
    ("face_tid_mid", lambda text: ("/etc/hostname" + text[text.index(" "):]).encode(),
     r"face_tid_mid\.txt:1: image name '/etc/hostname' is absolute or has '\.\.'"),
    ("face_tid_mid", lambda text: ("../../x.png" + text[text.index(" "):]).encode(),
     r"face_tid_mid\.txt:1: image name '\.\./\.\./x\.png' is absolute or has '\.\.'"),
])
def test_undecodable_oversized_or_escaping_meta_lines_are_named(tmp_path, kind, damage, message) -> None:
    root = str(tmp_path / "IJBB")
    faces, ids = _faces(2, 2)
    write_synthetic_ijb_release(root, faces, ids, name="ijbb")
    path = f"{root}/meta/ijbb_{kind}.txt"
    text = open(path, encoding="utf-8").read()
    with open(path, "wb") as handle:
        handle.write(damage(text))
    with pytest.raises(IJBReleaseError, match=message):
        read_ijb_release(root)


def test_bad_loose_crop_is_named_from_a_worker(tmp_path) -> None:
    root = str(tmp_path / "IJBC")
    faces, ids = _faces(2, 2)
    write_synthetic_ijb_release(root, faces, ids)
    _write(f"{root}/loose_crop/3.png", "not an image")
    with pytest.raises(IJBReleaseError, match=r"loose_crop/3\.png could not be decoded.*replace the file"):
        evaluate_ijb(RandomProjection(), root, image_size=SIZE, workers=1, progress=False)
    (tmp_path / "IJBC" / "loose_crop" / "3.png").unlink()
    with pytest.raises(IJBReleaseError, match=r"3\.png: missing \(1 of 4 loose crops"):
        evaluate_ijb(RandomProjection(), root, image_size=SIZE, progress=False)


def test_a_template_whose_faces_all_have_detector_score_zero_scores_zero() -> None:
    """D1 weights faces by detector score; a template of score-0 faces pools to the zero vector, which
    eval_ijbc.py's sklearn normalize leaves at zero: its pairs score 0 instead of failing the evaluation."""
    from facescale.eval.ijb_protocol import pair_scores

    embeddings = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    scores = pair_scores(embeddings, np.array([0.9, 0.0, 0.5]), template_ids=np.array([1, 2, 3]),
                         media_ids=np.array([10, 20, 30]), pair_templates=np.array([[1, 2], [1, 3], [2, 3]]),
                         mode=IJBMode())
    np.testing.assert_allclose(scores, [0.0, 0.6, 0.0])  # template 3 is (3, 4) / 5: cosine 0.6 with (1, 0)
