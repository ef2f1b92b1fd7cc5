"""`facescale embed`: aligned crops of a folder or list to `.npy` rows + a path list, like inference.py.

The reference embeds each PNG as a reader of arcface_torch's inference.py would: decoded by Pillow, scaled to
[-1, 1], one forward of the network (plus the mirror image's forward for flip), built here from the weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facescale.cli import main
from facescale.config.schema import ModelConfig
from facescale.models.registry import build_backbone
from tests.distributed import run_ranks

SIZE = 112
DIM = 32


def _face(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random HWC uint8 image (a blurred noise field: varied enough to give distinct embeddings)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="demo", embedding_size=DIM)).eval()
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def faces(tmp_path):
    """faces/b/1.png, faces/a/x/3.png ... (PNG: lossless, so any decoder gives the same pixels) and a
    non-image file that the folder walk must pass over."""
    root = tmp_path / "faces"
    layout = {"b/1.png": 1, "a/x/3.png": 3, "a/2.png": 2, "a/10.png": 10, "c.png": 4}
    for name, seed in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_face(seed)).save(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def _reference(model: torch.nn.Module, path, flip: bool) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    x = torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(x) + (model(torch.flip(x, dims=[3])) if flip else 0)
    return out[0].numpy()


def test_folder_rows_follow_the_sorted_paths_and_equal_the_plain_forward(weights, faces, tmp_path, capsys):
    path, model = weights
    out = tmp_path / "out" / "feats"
    assert main(["embed", "--weights", str(path), "--model", "demo", str(faces), "--out", str(out),
                 "--batch-size", "2", "--workers", "1"]) == 0
    listed = (tmp_path / "out" / "feats.txt").read_text().splitlines()
    names = [name.removeprefix(str(faces) + "/") for name in listed]
    assert names == ["c.png", "a/10.png", "a/2.png", "a/x/3.png", "b/1.png"]  # a directory's files, then dirs
    rows = np.load(tmp_path / "out" / "feats.npy")
    assert rows.dtype == np.float32 and rows.shape == (5, DIM)
    expected = np.stack([_reference(model, name, flip=True) for name in listed])
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5)
    assert '"images": 5' in capsys.readouterr().out


def test_list_keeps_its_order_and_no_flip_normalize_gives_unit_rows(weights, faces, tmp_path):
    path, model = weights
    (tmp_path / "list.txt").write_text("b/1.png\n\na/2.png\n" + str(faces / "c.png") + "\n")
    assert main(["embed", "--weights", str(path), "--model", "demo", "--list", str(tmp_path / "list.txt"),
                 "--root", str(faces), "--out", str(tmp_path / "f.npy"), "--no-flip", "--normalize",
                 "--workers", "0"]) == 0
    listed = (tmp_path / "f.txt").read_text().splitlines()
    assert listed == [str(faces / "b/1.png"), str(faces / "a/2.png"), str(faces / "c.png")]
    rows = np.load(tmp_path / "f.npy")
    plain = np.stack([_reference(model, name, flip=False) for name in listed])
    np.testing.assert_allclose(rows, plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-5)


def _embed_on_rank(rank: int, world: int, weights_path: str, paths: list[str], out: str,
                   skip_bad: bool = False) -> tuple[np.ndarray | None, list[int], int]:
    """(the written .npy on rank 0, the skipped indices, the rows this rank held)."""
    from facescale.checkpoint.weights import backbone_from_weights
    from facescale.eval.embed_images import embed_images, write_embeddings

    model = backbone_from_weights(weights_path, "demo", None)
    rows, skipped = embed_images(model, paths, SIZE, batch_size=2, device="cpu", rank=rank, world_size=world,
                                 workers=1, progress=False, skip_bad=skip_bad)
    kept = [path for index, path in enumerate(paths) if index not in set(skipped)]
    npy, _ = write_embeddings(out, rows, kept, normalize=False, rank=rank)
    return (np.load(npy) if rank == 0 else None), skipped, rows.local.shape[0]


@pytest.mark.slow
def test_two_ranks_equal_one_and_skip_the_same_bad_images(weights, faces, tmp_path):
    from facescale.eval.embed_images import list_images

    paths = list_images([str(faces)])
    single, none_skipped, held = _embed_on_rank(0, 1, str(weights[0]), paths, str(tmp_path / "one"))
    assert none_skipped == [] and held == 5
    results = run_ranks(_embed_on_rank, 2, str(weights[0]), paths, str(tmp_path / "two"))
    np.testing.assert_allclose(results[0][0], single, atol=1e-6)
    assert [skipped for _, skipped, _ in results] == [[], []]
    assert [held for _, _, held in results] == [3, 2]  # each rank held its own rows only
    (faces / "a" / "2.png").write_bytes(b"broken")  # index 2 of 5: rank 0's slice; 4 of 5: rank 1's
    Image.fromarray(_face(8, size=64)).save(faces / "b" / "1.png")
    results = run_ranks(_embed_on_rank, 2, str(weights[0]), paths, str(tmp_path / "skip"), True)
    assert [skipped for _, skipped, _ in results] == [[2, 4], [2, 4]]
    np.testing.assert_allclose(results[0][0], single[[0, 1, 3]], atol=1e-6)
    assert (tmp_path / "skip.txt").read_text().splitlines() == [paths[0], paths[1], paths[3]]


def test_skip_bad_leaves_bad_images_out_of_both_files_and_lists_them(weights, faces, tmp_path, capsys):
    path, model = weights
    (faces / "a" / "10.png").write_bytes(b"not a picture")
    Image.fromarray(_face(9, size=96)).save(faces / "a" / "x" / "3.png")
    out = tmp_path / "g"
    assert main(["embed", "--weights", str(path), "--model", "demo", str(faces), "--out", str(out),
                 "--workers", "1", "--batch-size", "2", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped"] == 2
    assert f"[embed] skipped {faces}/a/10.png could not be decoded" in captured.err
    assert f"[embed] skipped {faces}/a/x/3.png is 96x96, expected 112x112" in captured.err
    assert "--skip-bad" not in captured.err  # no advice to do what is being done
    kept = (tmp_path / "g.txt").read_text().splitlines()
    assert [name.removeprefix(f"{faces}/") for name in kept] == ["c.png", "a/2.png", "b/1.png"]
    left_out = (tmp_path / "g.skipped.txt").read_text().splitlines()
    assert left_out == [f"{faces}/a/10.png", f"{faces}/a/x/3.png"]
    expected = np.stack([_reference(model, name, flip=True) for name in kept])
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), expected, rtol=1e-4, atol=1e-5)
    for name in ("a/10.png", "a/x/3.png"):  # fixed: a run without bad images removes the old list
        Image.fromarray(_face(3)).save(faces / name)
    assert main(["embed", "--weights", str(path), "--model", "demo", str(faces), "--out", str(out),
                 "--workers", "0", "--skip-bad"]) == 0
    assert len((tmp_path / "g.txt").read_text().splitlines()) == 5
    assert not (tmp_path / "g.skipped.txt").exists()


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_bad_images_are_named_in_one_line_and_nothing_is_written(weights, faces, tmp_path, capsys):
    model = ["embed", "--weights", str(weights[0]), "--model", "demo", "--out", str(tmp_path / "o"),
             "--workers", "0"]
    Image.fromarray(_face(7, size=96)).save(faces / "a" / "small.png")
    assert _error(model + [str(faces)], capsys).endswith(
        f"{faces}/a/small.png is 96x96, expected 112x112; align the faces to crops of the model's input "
        "size; or rerun with --skip-bad to leave such images out")
    (faces / "a" / "small.png").write_bytes(b"not a picture")
    assert _error(model + [str(faces)], capsys).endswith(
        f"{faces}/a/small.png could not be decoded (no image format recognised); expected JPEG or PNG bytes; "
        "or rerun with --skip-bad to leave such images out")
    (faces / "empty").mkdir()
    assert f"{faces}/empty: holds no images" in _error(model + [str(faces / "empty")], capsys)
    assert f"{tmp_path}/absent: does not exist" in _error(model + [str(tmp_path / "absent")], capsys)
    (tmp_path / "l.txt").write_text("b/1.png\nb/9.png\n")
    line = _error(model + ["--list", str(tmp_path / "l.txt"), "--root", str(faces)], capsys)
    assert "l.txt: 1 listed image(s) do not exist, e.g. " in line and "b/9.png" in line and "--root" in line
    assert "no images to embed" in _error(model, capsys)
    assert not list(tmp_path.glob("o.*"))
    (tmp_path / "taken").write_text("a file where --out's folder would be")  # found before any embedding
    blocked = ["embed", "--weights", str(weights[0]), "--model", "demo", "--out",
               str(tmp_path / "taken" / "o"), "--workers", "0", str(faces / "b")]
    assert _error(blocked, capsys).endswith(
        f"{tmp_path}/taken: cannot create the folder for o.npy (File exists); give --out a place you can "
        "write, with room for the rows")


@pytest.mark.slow
def test_checkpoint_and_its_exported_weights_embed_alike(faces, tmp_path, capsys):
    """A real 1-rank demo run: `embed --checkpoint RUN` equals `export torch` + `embed --weights`; the export
    says the demo net is facescale's own (arcface_torch's get_model has no such name)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from facescale.data.synth import synthesize

    repo = Path(__file__).resolve().parents[1]
    synthesize(tmp_path / "shards", identities=8, images_per_identity=4, holdout_identities=0, seed=3,
               workers=1)
    argv = ["train", "--config", "configs/synthetic.yaml"]
    for item in (f"data.shards={tmp_path / 'shards'}", f"logging.run_dir={tmp_path / 'run'}", "eval.bins=[]",
                 "schedule.steps=2", "schedule.warmup_steps=0", "schedule.global_batch_size=16",
                 "data.num_workers=0"):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "facescale", *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run, pth = tmp_path / "run", tmp_path / "backbone.pth"
    assert main(["export", "torch", "--checkpoint", str(run), "--out", str(pth)]) == 0
    said = capsys.readouterr().out
    assert "arcface_torch has no 'demo' network: load it in facescale" in said and "get_model" not in said
    common = [str(faces), "--workers", "0", "--batch-size", "3"]
    assert main(["embed", "--checkpoint", str(run), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["embed", "--weights", str(pth), "--model", "demo", "--out", str(tmp_path / "b"),
                 *common]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
