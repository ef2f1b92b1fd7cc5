"""`facescale export torch` round-trips; `--weights FILE --model NAME` evaluates a plain state dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from facescale.checkpoint import load_backbone
from facescale.checkpoint.weights import read_backbone_weights
from facescale.cli import main
from facescale.config.schema import ModelConfig
from facescale.models import build_backbone
from tests.distributed import run_ranks


def _train_one_step(rank: int, world: int, shards: str, run_dir: str) -> int:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from facescale.config.load import load_config
    from facescale.runtime import select_runtime
    from facescale.train.trainer import Trainer
    from launcher.env import resolve_dist_env

    cfg = load_config("configs/synthetic.yaml", [
        "model.name=mbf", "model.embedding_size=64", f"data.shards={shards}", "data.reader=webdataset",
        "data.num_workers=0", f"logging.run_dir={run_dir}", "schedule.steps=1", "schedule.warmup_steps=0",
        "schedule.global_batch_size=8", "eval.bins=[]", "logging.tensorboard=false",
        "deepspeed.precision=fp32"])
    env = resolve_dist_env()
    return Trainer(cfg, env, select_runtime(env.local_rank, "fp32")).train().steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from facescale.data.synth import synthesize

    root = tmp_path_factory.mktemp("export")
    synthesize(root / "shards", identities=8, images_per_identity=4, holdout_identities=6, seed=2,
               verify_pairs=40)
    assert run_ranks(_train_one_step, 1, str(root / "shards"), str(root / "run"), timeout=600) == [1]
    return root / "shards", root / "run"


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(4))


@pytest.mark.slow
def test_export_torch_round_trips_into_a_fresh_model(trained, tmp_path, capsys) -> None:
    _, run = trained
    out = tmp_path / "backbone.pth"
    assert main(["export", "torch", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert "get_model('mbf', num_features=64)" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    fresh = build_backbone(ModelConfig(name="mbf", embedding_size=64))
    fresh.load_state_dict(state, strict=True)
    original, _ = load_backbone(run)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images()), original(images()))
    from_run = read_backbone_weights(run)  # what model.init_from / --weights read from a run directory
    assert from_run.keys() == state.keys() and all(torch.equal(from_run[k].float(), state[k].float())
                                                   for k in state)


@pytest.mark.slow
def test_weights_option_evaluates_like_the_checkpoint(trained, tmp_path, capsys) -> None:
    shards, run = trained
    out = tmp_path / "backbone.pth"
    assert main(["export", "torch", "--checkpoint", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    bins = ["--bin", str(shards / "verify.bin"), "--out", str(tmp_path / "eval")]
    assert main(["eval", "verify", "--checkpoint", str(run), *bins]) == 0
    from_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the 64-d embedding size is read from the file
    assert main(["eval", "verify", "--weights", str(out), "--model", "mbf", *bins]) == 0
    from_weights = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_weights["accuracy"] == from_run["accuracy"] and from_weights["num_pairs"] == 40


def test_weights_option_errors_name_the_option(tmp_path, capsys) -> None:
    weights, onnx_out = tmp_path / "backbone.pth", tmp_path / "m.onnx"
    torch.save(build_backbone(ModelConfig(name="mbf", embedding_size=64)).state_dict(), weights)
    assert main(["export", "onnx", "--weights", str(weights), "--out", str(onnx_out)]) == 2
    assert "facescale export onnx: error: --weights needs --model NAME" in capsys.readouterr().err
    assert main(["export", "onnx", "--weights", str(weights), "--model", "mbf", "--embedding-size", "128",
                 "--out", str(onnx_out)]) == 2
    message = capsys.readouterr().err
    assert "mis-shaped" in message and "set --embedding-size (the file's is 64)" in message
    assert main(["export", "onnx", "--weights", str(weights), "--model", "r18", "--out", str(onnx_out)]) == 2
    assert "set --model to its architecture" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_eval_ijb_takes_weights_and_model(tmp_path, capsys) -> None:
    import numpy as np

    from facescale.data.synth_faces import render_identity
    from facescale.eval.ijb import evaluate_ijb
    from facescale.eval.ijb_synth import write_synthetic_ijb_release

    faces, ids = [], []
    for identity in range(3):
        for face in render_identity(1, identity, 2, 112):
            faces.append(np.asarray(face))
            ids.append(identity)
    root = str(tmp_path / "IJBC")
    write_synthetic_ijb_release(root, faces, ids, name="ijbc", images_per_media=1, seed=2)
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="mbf", embedding_size=32)).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    assert main(["eval", "ijb", "--weights", str(tmp_path / "backbone.pth"), "--model", "mbf", "--root", root,
                 "--out", str(tmp_path / "out"), "--workers", "0", "--batch-size", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct = evaluate_ijb(model, root, batch_size=4, workers=0, progress=False)
    assert printed["num_genuine"] == direct["num_genuine"] == 3 and printed["num_impostor"] == 3
    np.testing.assert_allclose(np.load(printed["scores"]), direct["scores"], atol=1e-6)
