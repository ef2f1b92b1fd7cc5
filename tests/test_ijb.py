"""IJB-style template verification: media-then-template pooling by hand, synthetic set, end to end."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facescale.eval.ijb import (
    evaluate_ijb,
    read_ijb_meta,
    score_template_pairs,
    template_features,
    write_synthetic_ijb,
)

SIZE = 8


def test_media_then_template_pooling_by_hand() -> None:
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0], [5.0, 5.0]])
    template_ids = np.array([7, 7, 7, 3, 3])
    media_ids = np.array([1, 1, 2, 4, 5])
    templates, pooled = template_features(feats, template_ids, media_ids)
    assert templates.tolist() == [3, 7]
    # template 7: media 1 mean (2, 0), media 2 (0, 2) -> (1, 1); a flat image mean would give (4/3, 2/3)
    np.testing.assert_allclose(pooled[1], np.array([1.0, 1.0]) / np.sqrt(2))
    # template 3: media 4 (0, 1), media 5 (5, 5) -> (2.5, 3)
    np.testing.assert_allclose(pooled[0], np.array([2.5, 3.0]) / np.hypot(2.5, 3.0))
    _, normalized_first = template_features(feats, template_ids, media_ids, normalize_images=True)
    np.testing.assert_allclose(normalized_first[0], np.array([1 / np.sqrt(2), 1 + 1 / np.sqrt(2)])
                               / np.hypot(1 / np.sqrt(2), 1 + 1 / np.sqrt(2)))
    scores = score_template_pairs(templates, pooled, np.array([[7, 3], [3, 3]]))
    np.testing.assert_allclose(scores, [pooled[0] @ pooled[1], 1.0])
    with pytest.raises(ValueError, match="without features"):
        score_template_pairs(templates, pooled, np.array([[7, 9]]))


class CentredPixels(nn.Module):
    """A 'model' whose embedding is the mean-centred pixel vector, so identity structure carries through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)


def _faces(identities: int, per_identity: int) -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(0)
    faces = []
    for identity in range(identities):
        base = rng.integers(40, 216, (SIZE, SIZE, 3))
        for _ in range(per_identity):
            pixels = np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            faces.append((buffer.getvalue(), identity))
    return faces


def test_synthetic_set_round_trip_and_evaluation(tmp_path) -> None:
    root = str(tmp_path / "ijb")
    counts = write_synthetic_ijb(root, _faces(12, 5), name="ijbc", images_per_media=2)
    assert counts == {"images": 60, "templates": 24, "pairs": 12 + 66}
    meta = read_ijb_meta(root, "ijbc")
    assert len(meta.image_names) == 60 and meta.pair_labels.sum() == 12
    # identity 0 has images 0..4: template 1 = images 0,1,2 (medias 1: {0,1}, 2: {2}); template 2 = images 3,4
    assert meta.template_ids[:5].tolist() == [1, 1, 1, 2, 2]
    assert meta.media_ids[:5].tolist() == [1, 1, 2, 3, 3]
    report = evaluate_ijb(CentredPixels(), root, "ijbc", batch_size=16, image_size=SIZE, progress=False)
    assert report["num_templates"] == 24 and report["num_impostor"] == 66
    assert report["tar_at_far_1e-01"] == 1.0  # near-duplicate templates are all accepted
    assert report["tar_at_far_1e-02"] is None and report["tar_at_far_1e-06"] is None  # only 66 impostors
    assert report["scores"][meta.pair_labels == 1].min() > report["scores"][meta.pair_labels == 0].max()


def test_pair_file_naming_unknown_template_is_an_error(tmp_path) -> None:
    root = str(tmp_path / "ijb")
    write_synthetic_ijb(root, _faces(2, 2), name="ijbb")
    with open(f"{root}/meta/ijbb_template_pair_label.txt", "a") as handle:
        handle.write("1 99 0\n")
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label\.txt: template ids \[99\]"):
        read_ijb_meta(root, "ijbb")
    with pytest.raises(FileNotFoundError, match="ijbc_face_tid_mid.txt"):
        read_ijb_meta(root, "ijbc")
