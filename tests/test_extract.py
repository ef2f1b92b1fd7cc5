"""Embedding extraction: normalization, flip-sum, 2 ranks vs one process, .bin building and evaluation."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facescale.eval.extract import decode_image, evaluate_bin, extract_embeddings
from facescale.eval.make_bin import make_bin, parse_pairs
from tests.distributed import run_ranks

SIZE = 16


class TinyEmbedder(nn.Module):
    """Small conv net that is not flip-symmetric, so flip handling shows in its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * SIZE * SIZE, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ChannelMeans(nn.Module):
    """Returns each channel's mean: exposes channel order and normalization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_normalization_and_rgb_order() -> None:
    pixels = np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # red
    pixels[..., 2] = 51
    out = extract_embeddings(ChannelMeans(), [_png(pixels[0])], 4, "cpu", flip=False, image_size=SIZE,
                             progress=False)
    np.testing.assert_allclose(out, [[1.0, -1.0, (51 - 127.5) / 127.5]], atol=1e-6)


def test_flip_sum_and_mode_restored() -> None:
    model = TinyEmbedder().train()
    images = _images(5)
    got = extract_embeddings(model, images, 2, "cpu", flip=True, image_size=SIZE, progress=False)
    got_plain = extract_embeddings(model, images, 3, "cpu", flip=False, image_size=SIZE, progress=False)
    assert model.training
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    with torch.no_grad():
        model.eval()
        expected = model(x) + model(torch.flip(x, dims=[3]))
        plain = model(x)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_plain, plain.numpy(), atol=1e-5)
    assert not np.allclose(got, 2 * plain.numpy(), atol=1e-3)  # the flip really changes the output


def test_jpeg_bytes_decode_like_pil() -> None:
    data = _jpeg(_images(1)[0])
    with Image.open(io.BytesIO(data)) as img:
        reference = np.asarray(img.convert("RGB"))
    assert np.abs(decode_image(data, SIZE, "x.bin", 0).astype(int) - reference).max() <= 2


def test_wrong_size_and_garbage_are_named() -> None:
    with pytest.raises(ValueError, match=r"lfw\.bin: image 1 is 20x18, expected 16x16"):
        extract_embeddings(TinyEmbedder(), [_png(_images(1)[0]), _png(np.zeros((18, 20, 3), np.uint8))], 2,
                           "cpu", image_size=SIZE, source="lfw.bin", progress=False)
    with pytest.raises(ValueError, match=r"lfw\.bin: image 0 could not be decoded"):
        decode_image(b"not an image", SIZE, "lfw.bin", 0)


def _extract_on_rank(rank: int, world: int, images: np.ndarray | list) -> np.ndarray:
    return extract_embeddings(TinyEmbedder(), images, 2, "cpu", rank=rank, world_size=world,
                              image_size=SIZE, progress=False)


def _extract_sets_then_fail(rank: int, world: int, sets: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    results = [_extract_on_rank(rank, world, images) for images in sets]
    bad = list(_images(4, seed=3)) + [np.zeros((18, 20, 3), np.uint8)]  # image 4 lies in rank 1's slice
    try:
        extract_embeddings(TinyEmbedder(), bad, 2, "cpu", rank=rank, world_size=world, image_size=SIZE,
                           source="bad.bin", progress=False)
    except (ValueError, RuntimeError) as error:
        return results, str(error)
    return results, "no error"


def test_two_ranks_equal_single_process_and_fail_together() -> None:
    sets = [_images(7, seed=1), _images(1, seed=2)]  # uneven split; one rank with nothing to embed
    (rank0_sets, rank0_error), (rank1_sets, rank1_error) = run_ranks(_extract_sets_then_fail, 2, sets)
    assert "image 4 is 20x18" in rank1_error
    assert "failed on rank(s) [1]" in rank0_error  # rank 0 raised too instead of hanging in the gather
    for images, rank0, rank1 in zip(sets, rank0_sets, rank1_sets, strict=True):
        single = extract_embeddings(TinyEmbedder(), images, 2, "cpu", image_size=SIZE, progress=False)
        np.testing.assert_allclose(rank0, single, atol=1e-5)
        np.testing.assert_array_equal(rank0, rank1)


def _evaluate_rank_own_path(rank: int, world: int, paths: list[str]) -> str:
    from facescale.eval.binfile import EvalSetError
    from facescale.eval.extract import ExtractionFailed

    try:
        evaluate_bin(TinyEmbedder(), paths[rank], 4, "cpu", rank=rank, world_size=world, image_size=SIZE,
                     progress=False, pixel_reference=False)
    except (EvalSetError, ExtractionFailed) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_set_one_rank_cannot_read_fails_every_rank_instead_of_hanging(tmp_path) -> None:
    """Rank 1's copy of the set is gone (a node-local path, a lost mount) while rank 0 reads its own: rank 1
    names the file, rank 0 is told in the gather it already waits in, rather than both waiting forever."""
    from facescale.eval.binfile import write_bin

    good = write_bin(tmp_path / "lfw.bin", [_png(image) for image in _images(20, seed=4)], [True, False] * 5)
    rank0, rank1 = run_ranks(_evaluate_rank_own_path, 2, [str(good), str(tmp_path / "gone" / "lfw.bin")],
                             timeout=120)
    assert rank1.startswith("EvalSetError: ") and "gone/lfw.bin: verification set does not exist" in rank1
    assert rank0 == "ExtractionFailed: embedding extraction failed on rank(s) [1]; see that rank's error"


def _write_lfw_tree(root: str, people: int, per_person: int) -> str:
    """Aligned-crop folders <root>/<name>/<name>_000k.png and an LFW pairs file (header + same/diff lines)."""
    rng = np.random.default_rng(3)
    for p in range(people):
        name = f"Person_{p}"
        os.makedirs(os.path.join(root, name))
        base = rng.integers(0, 256, (SIZE, SIZE, 3))
        for k in range(1, per_person + 1):
            noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(os.path.join(root, name, f"{name}_{k:04d}.png"))
    lines = ["10\t2"]
    for p in range(people):
        lines.append(f"Person_{p}\t1\t2")
        lines.append(f"Person_{p}\t1\tPerson_{(p + 1) % people}\t2")
    pairs = os.path.join(root, "pairs.txt")
    with open(pairs, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return pairs


def test_parse_pairs_formats_and_errors(tmp_path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("10 300\nA 1 4\n\nA 1 B 2\n")
    assert parse_pairs(str(path)) == [("A", 1, "A", 4), ("A", 1, "B", 2)]
    path.write_text("A 1 4\nA one B 2\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:2"):
        parse_pairs(str(path))


def test_make_bin_then_evaluate(tmp_path) -> None:
    root = str(tmp_path / "lfw")
    pairs = _write_lfw_tree(root, people=10, per_person=2)
    out = str(tmp_path / "tiny.bin")
    assert make_bin(root, pairs, out, image_size=SIZE) == 20
    report = evaluate_bin(TinyEmbedder(), out, 8, "cpu", image_size=SIZE, progress=False)
    assert report["name"] == "tiny" and report["num_pairs"] == 20
    assert 0.0 <= report["accuracy"] <= 1.0 and report["tar_at_far_1e-03"] is None
    assert report["pixel_accuracy"] == 1.0  # near-duplicate pixels: the raw-pixel baseline separates them
    with pytest.raises(FileNotFoundError, match="Person_0_0009"):
        make_bin(root, _pairs_with(tmp_path, "Person_0\t1\t9"), str(tmp_path / "x.bin"), image_size=SIZE)


def _pairs_with(tmp_path, line: str) -> str:
    path = tmp_path / "bad_pairs.txt"
    path.write_text(line + "\n")
    return str(path)


def test_malformed_bin_is_named(tmp_path) -> None:
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="broken.bin"):
        evaluate_bin(TinyEmbedder(), str(bad), 4, "cpu", image_size=SIZE, progress=False)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([_png(_images(1)[0])] * 3, [True])))
    with pytest.raises(ValueError, match="odd.bin"):
        evaluate_bin(TinyEmbedder(), str(odd), 4, "cpu", image_size=SIZE, progress=False)


@pytest.mark.parametrize("flip", [True, False])
def test_bin_evaluation_reports_insightfaces_xnorm_and_sums_in_float64(tmp_path, flip) -> None:
    """insightface's verification: XNorm is the mean norm of every embedding, image and mirror apart, and
    the flip-sum is formed and normalised in float64 (np.zeros buffers) from the network's float32 outputs."""
    from facescale.eval.binfile import read_bin
    from facescale.eval.verification import verify_embeddings

    root = str(tmp_path / "lfw")
    pairs = _write_lfw_tree(root, people=10, per_person=2)
    out = str(tmp_path / "tiny.bin")
    make_bin(root, pairs, out, image_size=SIZE)
    model = TinyEmbedder().eval()
    report = evaluate_bin(model, out, 8, "cpu", image_size=SIZE, progress=False, pixel_reference=False,
                          flip=flip)
    images, issame = read_bin(out)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(image)).convert("RGB")) for image in images])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        outputs = [model(x).numpy()] + ([model(x.flip(3)).numpy()] if flip else [])
    norms = [np.linalg.norm(o.astype(np.float64), axis=1) for o in outputs]
    assert report["xnorm"] == pytest.approx(float(np.concatenate(norms).mean()), rel=1e-6)
    summed = sum(o.astype(np.float64) for o in outputs)
    expected = verify_embeddings(summed, issame)
    assert report["accuracy"] == expected.accuracy_mean and report["threshold"] == expected.best_threshold
    if flip:  # the summed embedding's norm is about twice XNorm
        assert 1.5 < report["embedding_norm"] / report["xnorm"] <= 2.0
