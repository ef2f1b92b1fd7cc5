"""Going on from an arcface_torch run (schedule.start_step with model.init_from / head.init_from of its
save_all_states checkpoints) keeps that run's optimizer state. The references are torch's own optimizers,
stepped here as arcface_torch steps its one SGD / AdamW over the backbone and the rank's Partial FC weight."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from facescale.checkpoint.arcface_torch import (
    NotCarried,
    backbone_state,
    saved_optimizer,
    saved_parameter_names,
)
from facescale.config.schema import ModelConfig
from facescale.heads.center_optimizer import CenterOptimizer
from facescale.models.registry import build_backbone
from launcher.local import local_train_command

REPO = Path(__file__).resolve().parents[1]
CLASSES, DIM, GPUS = 12, 128, 5  # 12 classes on 5 GPUs: rows 3, 3, 2, 2, 2 (PartialFC_V2's split)


def _rows_per_gpu() -> list[int]:
    return [CLASSES // GPUS + (1 if r < CLASSES % GPUS else 0) for r in range(GPUS)]


def _arcface_torch_run(out: Path, optimizer: str = "sgd", steps: int = 3) -> dict[str, list]:
    """checkpoint_gpu_<r>.pt as arcface_torch's save_all_states writes them after `steps` steps of its one
    optimizer per rank (the backbone's gradients equal on every rank, as DDP averages them); returns each
    rank's backbone parameters, center weight and optimizer (the reference state, keyed by tensor)."""
    out.mkdir(parents=True)
    torch.manual_seed(0)
    start = build_backbone(ModelConfig(name="demo", embedding_size=DIM)).state_dict()
    ranks: dict[str, list] = {"backbone": [], "fc": [], "opt": []}
    for rank, rows in enumerate(_rows_per_gpu()):
        backbone = build_backbone(ModelConfig(name="demo", embedding_size=DIM))
        backbone.load_state_dict(start)
        fc = torch.nn.Parameter(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(100 + rank)))
        groups = [{"params": backbone.parameters()}, {"params": [fc]}]
        opt = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1))
        same = torch.Generator().manual_seed(1)  # the backbone's gradients: equal on every rank
        own = torch.Generator().manual_seed(200 + rank)
        for _ in range(steps):
            for p in backbone.parameters():  # a frozen parameter (features.weight) gets none
                p.grad = torch.randn(p.shape, generator=same) if p.requires_grad else None
            fc.grad = torch.randn(fc.shape, generator=own)
            opt.step()
        torch.save({"epoch": 1, "global_step": steps, "state_dict_backbone": backbone.state_dict(),
                    "state_dict_softmax_fc": {"weight": fc.detach().clone()},
                    "state_optimizer": opt.state_dict(), "state_lr_scheduler": {"last_epoch": steps}},
                   out / f"checkpoint_gpu_{rank}.pt")
        ranks["backbone"].append(backbone)
        ranks["fc"].append(fc)
        ranks["opt"].append(opt)
    return ranks


def _model_params(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Size]]:
    named = list(model.named_parameters())
    return [n for n, _ in named], {n: p.shape for n, p in named if p.requires_grad}


@pytest.mark.parametrize("optimizer,keys",
                         [("sgd", ["momentum_buffer"]), ("adamw", ["exp_avg", "exp_avg_sq"])])
def test_the_backbone_state_is_each_parameters_own(tmp_path, optimizer, keys) -> None:
    ref = _arcface_torch_run(tmp_path / "run", optimizer)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_gpu_2.pt", weights_only=True)
    saved = saved_optimizer(checkpoint)
    assert saved.kind == optimizer
    model = build_backbone(ModelConfig(name="demo", embedding_size=DIM))
    state = backbone_state(saved, saved_parameter_names(checkpoint), *_model_params(model))
    backbone, opt = ref["backbone"][2], ref["opt"][2]
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    assert sorted(state["params"]) == sorted(n for n, _ in trainable)
    assert len(trainable) < len(list(backbone.parameters()))  # a frozen one is mapped past, not left out
    for name, param in trainable:
        for key in keys:
            assert torch.equal(state["params"][name][key], opt.state[param][key]), (name, key)
    if optimizer == "adamw":
        assert float(state["scalars"]["step"]) == 3.0
    else:
        assert state["scalars"] == {}
    for rank, fc in enumerate(ref["fc"]):  # the centers' state: each rank's own rows
        rows = saved_optimizer(torch.load(tmp_path / "run" / f"checkpoint_gpu_{rank}.pt", weights_only=True))
        assert torch.equal(rows.centers[keys[0]], ref["opt"][rank].state[fc][keys[0]])


def test_what_cannot_be_carried_says_why(tmp_path) -> None:
    _arcface_torch_run(tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_gpu_0.pt", weights_only=True)
    model = build_backbone(ModelConfig(name="demo", embedding_size=DIM))
    with pytest.raises(NotCarried, match="no state_optimizer"):
        saved_optimizer({**checkpoint, "state_optimizer": {}})
    one_group = dict(checkpoint["state_optimizer"])
    one_group["param_groups"] = one_group["param_groups"][:1]
    with pytest.raises(NotCarried, match="1 parameter groups, not arcface_torch's two"):
        saved_optimizer({**checkpoint, "state_optimizer": one_group})
    with pytest.raises(NotCarried, match="holds no state"):
        saved_optimizer({**checkpoint, "state_optimizer": {**checkpoint["state_optimizer"], "state": {}}})
    other = build_backbone(ModelConfig(name="mbf", embedding_size=DIM))  # another network's parameters
    with pytest.raises(NotCarried, match="not one model's"):
        backbone_state(saved_optimizer(checkpoint), saved_parameter_names(checkpoint), *_model_params(other))
    names, shapes = _model_params(model)
    assert backbone_state(saved_optimizer(checkpoint), saved_parameter_names(checkpoint), names, shapes)


GROUPS = [{"params": [0]}, {"params": [1]}]
MOMENTUM = {"momentum_buffer": torch.ones(2)}


@pytest.mark.parametrize(("saved", "reason"), [
    ({"param_groups": [1, 2]}, "param_groups are not torch's"),
    ({"param_groups": "ab"}, "param_groups are not torch's"),
    ({"param_groups": [{"params": 0}, {"params": [1]}]}, "param_groups are not torch's"),
    ({"param_groups": [{"params": [[0]]}, {"params": [1]}]}, "param_groups are not torch's"),
    ({"param_groups": GROUPS, "state": [MOMENTUM]}, "state is not torch's"),
    ({"param_groups": GROUPS, "state": {0: 5, 1: MOMENTUM}}, "state is not torch's"),
    ({"param_groups": GROUPS, "state": {0: {"exp_avg": torch.ones(2), "step": "x"}}}, "step that is not a"),
])
def test_a_malformed_state_optimizer_is_not_carried_and_says_why(saved, reason) -> None:
    """A damaged or hand-made state_optimizer was an AttributeError / TypeError past the callers, which catch
    NotCarried (and then start the optimizer state fresh, saying why)."""
    with pytest.raises(NotCarried, match=reason):
        saved_optimizer({"state_dict_backbone": {}, "state_optimizer": saved})
    well_formed = {"param_groups": GROUPS, "state": {1: MOMENTUM}}
    assert saved_optimizer({"state_optimizer": well_formed}).kind == "sgd"


def test_center_rows_come_from_the_files_that_hold_them(tmp_path) -> None:
    """A facescale rank's rows straddle arcface_torch's per-GPU files (rows 3/3/2/2/2 read as 0-4, 5-11)."""
    from facescale.partial_fc.init_centers import open_center_source, read_center_state_rows
    from facescale.partial_fc.mode import _carried_state

    sgd = _arcface_torch_run(tmp_path / "sgd")
    full = torch.cat([o.state[fc]["momentum_buffer"] for fc, o in zip(sgd["fc"], sgd["opt"], strict=True)])
    source = open_center_source(tmp_path / "sgd")
    for start, count in ((0, 5), (5, 7)):
        kind, rows, step = read_center_state_rows(source, start, count)
        assert kind == "sgd" and step is None
        assert torch.equal(rows["momentum_buffer"], full[start:start + count])

    adamw = _arcface_torch_run(tmp_path / "adamw", "adamw")
    head = SimpleNamespace(start=5, count=7, center_optimizer=CenterOptimizer(7, DIM, kind="adamw"))
    rows, note = _carried_state(open_center_source(tmp_path / "adamw"), head, "adamw")
    expected = torch.cat([opt.state[fc]["exp_avg_sq"] for fc, opt in zip(adamw["fc"], adamw["opt"],
                                                                           strict=True)])[5:12]
    assert torch.equal(rows["exp_avg_sq"], expected)
    assert rows["row_steps"].tolist() == [3] * 7  # AdamW's bias correction goes on from its step
    assert note == "with their saved exp_avg, exp_avg_sq, row_steps"
    rows, note = _carried_state(open_center_source(tmp_path / "adamw"), head, "sgd")
    assert rows == {} and note == "optimizer state starts fresh: it was saved by adamw, head.optimizer is sgd"
    no_momentum = SimpleNamespace(start=0, count=5, center_optimizer=CenterOptimizer(5, DIM, momentum=0.0))
    rows, note = _carried_state(source, no_momentum, "sgd")  # head.momentum 0 keeps no buffer to fill
    assert rows == {} and note == ("optimizer state starts fresh: this run's center optimizer keeps no "
                                   "momentum_buffer")


def test_the_first_partial_fcs_files_give_centers_and_momentum(tmp_path) -> None:
    """arcface_torch's first PartialFC (2021) saved rank_<r>_softmax_weight.pt and ..._mom.pt, bare tensors
    of the rank's rows (the same split as PartialFC_V2)."""
    from facescale.partial_fc.init_centers import (
        CenterSourceError,
        check_center_source,
        open_center_source,
        read_center_rows,
        read_center_state_rows,
    )

    gen = torch.Generator().manual_seed(3)
    weight, momentum = torch.randn(CLASSES, DIM, generator=gen), torch.randn(CLASSES, DIM, generator=gen)
    out = tmp_path / "v1"
    out.mkdir()
    start = 0
    for rank, rows in enumerate(_rows_per_gpu()):
        torch.save(weight[start:start + rows].clone(), out / f"rank_{rank}_softmax_weight.pt")
        torch.save(momentum[start:start + rows].clone(), out / f"rank_{rank}_softmax_weight_mom.pt")
        start += rows
    source = open_center_source(out)
    assert (source.num_classes, source.dim) == (CLASSES, DIM)
    assert torch.equal(read_center_rows(source, 5, 7), weight[5:12])
    kind, rows, step = read_center_state_rows(source, 5, 7)
    assert (kind, step) == ("sgd", None) and torch.equal(rows["momentum_buffer"], momentum[5:12])

    with pytest.raises(CenterSourceError, match="names one rank's file of a multi-GPU arcface_torch run"):
        check_center_source(open_center_source(out / "rank_1_softmax_weight.pt"), CLASSES, DIM)
    (out / "rank_3_softmax_weight_mom.pt").unlink()
    with pytest.raises(NotCarried, match="no rank_3_softmax_weight_mom.pt beside rank_3_softmax_weight.pt"):
        read_center_state_rows(source, 5, 7)
    (out / "rank_2_softmax_weight.pt").unlink()
    with pytest.raises(CenterSourceError, match=r"rank_2_softmax_weight.pt is missing \(4 of 5"):
        open_center_source(out)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 identities x 4 images: 3 steps of 16 per epoch."""
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("carry") / "shards"
    synthesize(out, identities=CLASSES, images_per_identity=4, holdout_identities=0, seed=7, workers=1)
    return out


def _go_on(shards: Path, saved: Path, run_dir: Path) -> str:
    """2 ranks (ZeRO-2: partitioned optimizer state), each with classes from two of the 5 GPUs' files."""
    cmd = local_train_command(2, "configs/synthetic.yaml", [
        f"data.shards={shards}", f"logging.run_dir={run_dir}", "eval.bins=[]", "schedule.steps=4",
        "schedule.warmup_steps=0", "schedule.global_batch_size=16", "data.num_workers=0",
        f"model.init_from={saved / 'checkpoint_gpu_0.pt'}", f"head.init_from={saved}",
        "schedule.start_step=3", "deepspeed.zero_stage=2"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def _saved_state(run_dir: Path) -> tuple[dict, torch.Tensor]:
    from facescale.checkpoint.reshard import load_head_shards, reshard_head

    step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert step.name == "step_00000004"
    backbone = torch.load(step / "backbone_optim.pt", weights_only=True)["params"]
    head = reshard_head(load_head_shards(step, 2), 1, 0)  # both ranks' rows in class order
    return backbone, head["optimizer"]["momentum_buffer"]


@pytest.mark.slow
def test_a_run_going_on_from_arcface_torch_keeps_its_momentum(shards, tmp_path) -> None:
    """The first step here is one more step of their SGD: with the same weights, data and gradient, the
    momentum after it differs from a fresh-momentum run's by exactly momentum x their saved buffer, in every
    backbone parameter (ZeRO-2's partitioned state) and every class center (dense update)."""
    ref = _arcface_torch_run(tmp_path / "arcface")
    fresh = tmp_path / "without"
    fresh.mkdir()
    for rank in range(GPUS):  # the same files with the optimizer state left out
        name = f"checkpoint_gpu_{rank}.pt"
        checkpoint = torch.load(tmp_path / "arcface" / name, weights_only=True)
        torch.save({k: v for k, v in checkpoint.items() if k != "state_optimizer"}, fresh / name)

    out = _go_on(shards, tmp_path / "arcface", tmp_path / "a")
    count = sum(p.requires_grad for p in ref["backbone"][0].parameters())
    assert f"schedule.start_step: the backbone's momentum_buffer of {count} parameters go on from" in out
    assert "head.init_from: class centers 0..5 of 12 from" in out  # rank 0's line
    assert "(with their saved momentum_buffer)" in out
    out = _go_on(shards, fresh, tmp_path / "b")
    assert ("the backbone's optimizer state starts fresh: the checkpoint has no state_optimizer "
            "(save_all_states writes it)") in out
    assert "(optimizer state starts fresh: the checkpoint has no state_optimizer" in out

    backbone_a, centers_a = _saved_state(tmp_path / "a")
    backbone_b, centers_b = _saved_state(tmp_path / "b")
    backbone, opt = ref["backbone"][0], ref["opt"][0]
    for name, param in [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]:
        carried = 0.9 * opt.state[param]["momentum_buffer"]
        diff = backbone_a[name]["momentum_buffer"] - backbone_b[name]["momentum_buffer"]
        torch.testing.assert_close(diff, carried, rtol=1e-4, atol=1e-5, msg=name)
    saved_rows = torch.cat([o.state[fc]["momentum_buffer"] for fc, o in zip(ref["fc"], ref["opt"],
                                                                            strict=True)])
    torch.testing.assert_close(centers_a.float() - centers_b.float(), 0.9 * saved_rows, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_carried_adam_step_is_placed_as_torchs_own_load_state_dict_places_it(fused) -> None:
    """A fused (or capturable) AdamW reads `step` on the parameters' device; torch's load_state_dict moves it
    there, and so must a state written into DeepSpeed's optimizer (the parameter here is on the meta device,
    standing in for CUDA on this CPU machine)."""
    from facescale.checkpoint.backbone_state import placed_scalar

    reference = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([reference], fused=fused)
    state = {"state": {0: {"step": torch.tensor(7.0, dtype=torch.float64), "exp_avg": torch.zeros(3),
                           "exp_avg_sq": torch.zeros(3)}}, "param_groups": opt.state_dict()["param_groups"]}
    opt.load_state_dict(state)
    loaded = opt.state[reference]["step"]
    placed = placed_scalar("step", torch.tensor(7.0, dtype=torch.float64), reference, opt.param_groups[0])
    assert (placed.dtype, placed.device, float(placed)) == (loaded.dtype, loaded.device, 7.0)
    on_meta = placed_scalar("step", torch.tensor(7.0), torch.empty(3, device="meta"), {"fused": fused})
    assert on_meta.device.type == ("meta" if fused else "cpu")
