"""Plug-ins: a module named by FACESCALE_PLUGINS adds a backbone and a training mode without editing
facescale; the config accepts them, their own settings are checked, a run trains, reshards and exports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from facescale.cli import main
from facescale.config.errors import ConfigError
from facescale.models import registry as backbones
from facescale.modes import registry as modes
from tests.distributed import run_ranks

PLUGIN = '''
import torch
from torch import nn

from facescale.models.registry import register_backbone
from facescale.modes.registry import register_mode
from facescale.partial_fc.mode import PartialFCMode


class PatchNet(nn.Module):
    """Not one of facescale's networks: names of its own (`patch_embed.weight` and `pos_embed` included,
    which facescale's legacy ViT names also had)."""

    def __init__(self, width: int, embedding_size: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, 16, stride=16)
        self.pos_embed = nn.Parameter(torch.zeros(1, width))
        self.head = nn.Linear(width, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        return self.features(self.head(self.patch_embed(x).mean(dim=(2, 3)) + self.pos_embed))


@register_backbone("patch_net", options=("width",))
def patch_net(cfg):
    return PatchNet(int(cfg.options.get("width", 8)), cfg.embedding_size)


class NotedPartialFC(PartialFCMode):
    name = "noted_pfc"
    options = ("note",)


MODE = register_mode(NotedPartialFC())
'''


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plug-in module on sys.path and in FACESCALE_PLUGINS; registries restored afterwards."""
    from facescale import plugins

    (tmp_path / "fs_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "fs_test_plugin")
    monkeypatch.setattr(modes, "_MODES", dict(modes._MODES))
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    monkeypatch.setattr(backbones, "_OPTIONS", dict(backbones._OPTIONS))
    monkeypatch.setattr(plugins, "_loaded", [])
    monkeypatch.delitem(sys.modules, "fs_test_plugin", raising=False)
    yield "fs_test_plugin"
    sys.modules.pop("fs_test_plugin", None)


def _config(shards: str, run_dir: str, *extra: str):
    from facescale.config.load import load_config

    return load_config("configs/synthetic.yaml", [
        "model.name=patch_net", "model.embedding_size=16", "model.options={width: 12}", "head.type=noted_pfc",
        "head.options={note: hello}", f"data.shards={shards}", "data.reader=webdataset", "data.num_workers=0",
        f"logging.run_dir={run_dir}", "schedule.steps=2", "schedule.warmup_steps=0",
        "schedule.global_batch_size=8", "eval.bins=[]", "logging.tensorboard=false",
        "deepspeed.precision=fp32", *extra])


def _train(rank: int, world: int, shards: str, run_dir: str) -> list[str]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from facescale.plugins import load_plugins
    from facescale.runtime import select_runtime
    from facescale.train.trainer import Trainer
    from launcher.env import resolve_dist_env

    load_plugins()  # what `facescale train` does first, in every rank
    env = resolve_dist_env()
    trainer = Trainer(_config(shards, run_dir), env, select_runtime(env.local_rank, "fp32"))
    lines = trainer._plan()
    assert trainer.train().steps == 2
    return lines


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from facescale.data.synth import synthesize

    root = tmp_path_factory.mktemp("plugin_data") / "shards"
    synthesize(root, identities=8, images_per_identity=4, holdout_identities=6, seed=2, verify_pairs=40)
    return str(root)


def test_a_plugin_mode_and_backbone_are_configured_and_their_options_checked(plugin, shards, tmp_path):
    from facescale.plugins import load_plugins

    assert load_plugins() == [plugin]
    run = str(tmp_path / "run")
    cfg = _config(shards, run)
    assert (cfg.head.type, cfg.head.options) == ("noted_pfc", {"note": "hello"})
    assert cfg.model.options == {"width": 12}
    refusals = {
        "head.options={colour: red}": r"head\.options\.colour: training mode 'noted_pfc' has no such option "
                                      r"\(it reads note\)",
        "model.options={depth: 3}": r"model\.options\.depth: backbone 'patch_net' has no such option \(it "
                                    r"reads width\)",
        "head.type=partial_fc": r"head\.options\.note: training mode 'partial_fc' has no such option \(it "
                                r"reads none\)",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            _config(shards, run, override)
    with pytest.raises(ConfigError, match=r"model\.options\.width: backbone 'r18' has no such option"):
        _config(shards, run, "model.name=r18", "head.options={}")


def test_a_plugin_cannot_take_a_built_in_mode_name(plugin) -> None:
    from facescale.partial_fc.mode import PartialFCMode

    class Shadow(PartialFCMode):
        pass  # forgot its own `name`: inherits 'partial_fc'

    with pytest.raises(ValueError, match="training mode 'partial_fc' is built in"):
        modes.register_mode(Shadow())
    assert type(modes.get_mode("partial_fc")) is PartialFCMode


def test_a_plugin_that_does_not_import_is_one_line(plugin, monkeypatch, capsys) -> None:
    from facescale.plugins import PLUGINS_ENV

    monkeypatch.setenv(PLUGINS_ENV, "fs_test_plugin, fs_no_such_plugin")
    assert main(["reshard", "--checkpoint", "nowhere", "--world-size", "2", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plug-in 'fs_no_such_plugin' (from FACESCALE_PLUGINS) failed to import: " \
                             "ModuleNotFoundError" in err[0], err


@pytest.mark.slow
def test_a_plugin_run_trains_reshards_and_exports(plugin, shards, tmp_path) -> None:
    from facescale.checkpoint import load_backbone
    from facescale.checkpoint.layout import resolve_checkpoint
    from facescale.checkpoint.reshard import reshard_checkpoint
    from facescale.plugins import load_plugins

    run = tmp_path / "run"
    [lines] = run_ranks(_train, 1, shards, str(run), timeout=600)
    head_line = next(line for line in lines if "head: " in line)
    assert "head: Partial FC: 8 centers per rank (of 8)" in head_line  # the mode's own describe

    load_plugins()
    model, cfg = load_backbone(run)  # its own names, `patch_embed.weight` and `pos_embed` kept as they are
    assert cfg.model.name == "patch_net" and model.patch_embed.out_channels == 12
    out = reshard_checkpoint(resolve_checkpoint(run), 2, tmp_path / "w2")
    assert sorted(p.name for p in (out / "head").iterdir()) == [f"shard-0000{r}-of-00002.pt" for r in (0, 1)]
    assert main(["export", "torch", "--checkpoint", str(run), "--out", str(tmp_path / "b.pth")]) == 0
    state = torch.load(tmp_path / "b.pth", weights_only=True)
    assert torch.equal(state["patch_embed.weight"], model.state_dict()["patch_embed.weight"].float())
