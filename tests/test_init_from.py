"""model.init_from: arcface_torch-named weights start a 2-rank run; strict/lenient loading; resume wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from facescale.checkpoint.weights import WeightsError, load_backbone_weights, read_backbone_weights
from facescale.config.schema import ModelConfig
from facescale.models import build_backbone
from tests.arcface_torch_keys import ARCFACE_TORCH_KEYS
from tests.distributed import run_ranks


def arcface_torch_state(name: str, embedding: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plausible state dict with arcface_torch's names and shapes: fan-in scaled weights, BN statistics."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in ARCFACE_TORCH_KEYS[name](embedding).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # norm / PReLU weights
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def fixed_images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=16, images_per_identity=4, holdout_identities=4, seed=5, verify_pairs=20)
    return out


def _fine_tune(rank: int, world: int, name: str, weights: str, shards: str, run_dir: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from facescale.config.load import load_config
    from facescale.runtime import select_runtime
    from facescale.train.trainer import Trainer
    from launcher.env import resolve_dist_env

    settings = [f"model.name={name}", "model.embedding_size=512", f"model.init_from={weights}",
                f"data.shards={shards}", "data.reader=webdataset", "data.num_workers=0",
                f"logging.run_dir={run_dir}",
                "schedule.steps=2", "schedule.warmup_steps=0", "schedule.global_batch_size=8", "eval.bins=[]",
                "logging.every_steps=1", "logging.tensorboard=false", "checkpoint.every_steps=0",
                "deepspeed.precision=fp32"]
    if name.startswith("vit"):
        settings += ["model.drop_path_rate=0.0", "model.mask_ratio=0.0"]
    cfg = load_config("configs/synthetic.yaml", settings)
    env = resolve_dist_env()
    trainer = Trainer(cfg, env, select_runtime(env.local_rank, "fp32"))
    module = trainer.engine.module
    module.eval()
    with torch.no_grad():
        first = module(fixed_images())
    module.train()
    result = trainer.train()
    out = {"first": first, "loss": result.final_loss, "steps": result.steps}
    if name == "mbf":  # a second start of the same run resumes: the checkpoint wins over init_from
        resumed = Trainer(cfg, env, select_runtime(env.local_rank, "fp32"))
        out["resumed_step"] = resumed.step
        out["resumed"] = {k: v.clone() for k, v in resumed.engine.module.state_dict().items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r50", "mbf", "vit_t"])
def test_init_from_arcface_torch_weights_fine_tunes_on_two_ranks(name: str, shards: Path, tmp_path: Path):
    state = arcface_torch_state(name)
    weights = tmp_path / "backbone.pth"
    torch.save(state, weights)
    source = build_backbone(ModelConfig(name=name, embedding_size=512, drop_path_rate=None))
    source.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = source.eval()(fixed_images())

    results = run_ranks(_fine_tune, 2, name, str(weights), str(shards), str(tmp_path / "run"), timeout=900)
    for rank_result in results:
        torch.testing.assert_close(rank_result["first"], expected, rtol=1e-5, atol=1e-5)
        assert rank_result["steps"] == 2 and torch.isfinite(torch.tensor(rank_result["loss"]))
    if name == "mbf":
        step_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
        saved = torch.load(step_dir / "backbone.pt", weights_only=True)
        assert results[0]["resumed_step"] == 2
        for key, value in saved.items():
            torch.testing.assert_close(results[0]["resumed"][key].to(value.dtype), value, msg=key)
        trained = [k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], state[k])]
        assert trained  # two steps changed the weights, so "equals the checkpoint" is not "equals the file"


def test_strict_mismatch_lists_keys_and_names_the_setting() -> None:
    state = arcface_torch_state("mbf", embedding=128)
    model = build_backbone(ModelConfig(name="mbf", embedding_size=512))
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(model, state, source="backbone.pth")
    message = str(err.value)
    assert "mis-shaped 5: features.layers.2.weight (128, 512) vs model (512, 512)" in message
    assert "set model.embedding_size (the file's is 128)" in message and "model.init_strict: false" in message

    other = build_backbone(ModelConfig(name="r18", embedding_size=128))
    with pytest.raises(WeightsError, match=r"missing \d+: conv1.weight.*\(it fits mbf\): set model.name"):
        load_backbone_weights(other, state, source="backbone.pth")


@pytest.mark.parametrize("name", sorted(ARCFACE_TORCH_KEYS))
def test_cli_mismatch_names_the_network_the_file_fits_and_offers_no_partial_load(tmp_path, capsys, name):
    """A bare arcface_torch backbone.pth does not say its network: eval names the one whose keys it has,
    and does not suggest loading part of it (an evaluation needs every weight)."""
    from io import BytesIO

    from PIL import Image

    from facescale.cli import main
    from facescale.eval.binfile import write_bin

    weights = tmp_path / "backbone.pth"
    torch.save(arcface_torch_state(name, embedding=256), weights)
    jpeg = BytesIO()
    Image.new("RGB", (112, 112)).save(jpeg, "JPEG")
    verify_set = write_bin(tmp_path / "lfw.bin", [jpeg.getvalue()] * 20, [True, False] * 5)  # never scored
    command = ["eval", "verify", "--weights", str(weights), "--model", "r18", "--bin", str(verify_set)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"(it fits {name}): set --model to its architecture" in err
    assert "init_strict" not in err and "only the keys" not in err


def test_lenient_load_keeps_the_new_embedding_layer_and_reports_it() -> None:
    state = arcface_torch_state("mbf", embedding=128)
    model = build_backbone(ModelConfig(name="mbf", embedding_size=512))
    fresh_fc = model.features.layers[2].weight.detach().clone()
    report = load_backbone_weights(model, state, strict=False)
    assert report.misshaped == ["features.layers.2.weight"] + [
        f"features.layers.3.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    assert report.loaded == len(state) - 5 and not report.missing and not report.unexpected
    torch.testing.assert_close(model.conv_sep.layers[0].weight, state["conv_sep.layers.0.weight"])
    torch.testing.assert_close(model.features.layers[2].weight, fresh_fc)
    assert any("other shape" in line for line in report.skipped_lines())


def test_read_accepts_arcface_torch_checkpoints_and_refuses_non_state_dicts(tmp_path: Path) -> None:
    state = {"conv1.weight": torch.ones(2, 3)}
    torch.save({"epoch": 3, "state_dict_backbone": state, "state_optimizer": {}}, tmp_path / "ckpt.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    assert read_backbone_weights(tmp_path / "ckpt.pt").keys() == state.keys()
    assert read_backbone_weights(tmp_path / "ddp.pth").keys() == state.keys()
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds no backbone state dict"):
        read_backbone_weights(tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="no such file"):
        read_backbone_weights(tmp_path / "absent.pth")


@pytest.mark.parametrize("obj", [{0: torch.zeros(3)}, {"state_dict_backbone": {(1, 2): torch.zeros(3)}}],
                         ids=["int-keys", "tuple-keys-nested"])
def test_state_dicts_keyed_by_other_than_names_are_refused(tmp_path: Path, obj) -> None:
    torch.save(obj, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="odd.pth: holds no backbone state dict"):
        read_backbone_weights(tmp_path / "odd.pth")


class _Call:
    """Pickles as a call of os.getcwd: a global the weights-only loader refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(("write", "detail"), [
    (lambda path: torch.save({"w": _Call()}, path), "(global posix.getcwd)"),
    (lambda path: path.write_bytes(b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00N."),  # protocol 4 framing
     "(Unsupported operand 149)"),
], ids=["global", "opcode"])
def test_refused_files_name_what_was_refused_without_torchs_advice(tmp_path: Path, write, detail) -> None:
    write(tmp_path / "w.pth")
    with pytest.raises(WeightsError) as error:
        read_backbone_weights(tmp_path / "w.pth")
    line = error.value.line()
    assert f"w.pth: refusing to load it: it holds objects facescale never writes {detail}" in line
    assert "nothing in it was run" in line and "weights_only" not in line


_PEAK_READ = """
import re, sys
import torch
from facescale.checkpoint.weights import read_backbone_weights
def peak_kib():  # this process's own high-water RSS (ru_maxrss would carry the forking parent's across exec)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = peak_kib()
state = read_backbone_weights(sys.argv[1])
print((peak_kib() - before) * 1024, float(sum(v.double().sum() for v in state.values())))
"""


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_backbone_weights_of_a_checkpoint_gpu_file_leave_its_centers_unread(tmp_path: Path, legacy) -> None:
    """A WebFace42M-scale checkpoint_gpu_0.pt is mostly class centers and their momentum (~1 GiB per GPU);
    every rank reads the backbone from it (pre-flight and build): the centers must not come into memory."""
    import subprocess
    import sys

    state = arcface_torch_state("mbf")
    centers = torch.full((64_000, 512), 0.5)  # 125 MiB, then as much again in the optimizer state
    torch.save({"epoch": 1, "global_step": 10, "state_dict_backbone": state,
                "state_dict_softmax_fc": {"weight": centers},
                "state_optimizer": {"state": {0: {"momentum_buffer": centers.clone()}}, "param_groups": []}},
               tmp_path / "checkpoint_gpu_0.pt", _use_new_zipfile_serialization=not legacy)
    out = subprocess.run([sys.executable, "-c", _PEAK_READ, str(tmp_path / "checkpoint_gpu_0.pt")],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."})
    grown, total = out.stdout.split()
    assert float(total) == pytest.approx(float(sum(v.double().sum() for v in state.values())), rel=1e-12)
    if not legacy:  # a pre-zip file cannot be mapped: read whole, as torch reads it
        assert int(grown) < centers.nbytes / 4, f"the read grew the process by {int(grown) >> 20} MiB"


def test_train_refuses_a_mismatched_init_from_before_the_process_group(shards, tmp_path, capsys) -> None:
    from facescale.cli import main

    weights = tmp_path / "backbone.pth"
    torch.save(arcface_torch_state("mbf", embedding=128), weights)
    run_dir = tmp_path / "run"
    settings = ["model.name=mbf", "model.embedding_size=512", f"model.init_from={weights}",
                f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]"]
    args = ["train", "--config", "configs/synthetic.yaml"] + [x for s in settings for x in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("facescale train: error: model.init_from")
    assert "set model.embedding_size (the file's is 128)" in err[0] and not run_dir.exists()
    # a run that resumes never reads init_from: the same settings pass this check once a checkpoint exists
    from facescale.config.load import load_config
    from facescale.train.init_weights import check_init_from

    cfg = load_config("configs/synthetic.yaml", settings)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000001")
    check_init_from(cfg)
