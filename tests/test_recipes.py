"""Each arcface_torch recipe config resolves to insightface's published values (a table of facts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facescale.config.load import load_config
from facescale.config.schedule_resolve import resolve_schedule

MS1MV3, GLINT, WF42M = 5_179_510, 17_091_657, 42_474_557  # num_image of arcface_torch's configs

# recipe: network, margin_list, lr, weight_decay, batch_size (per GPU), num_epoch, warmup_epoch, sample_rate,
# optimizer, GPUs, num_image; from insightface recognition/arcface_torch/configs/<source>.py (SOURCES)
ARCFACE_TORCH = {
    "ms1mv3_r50": ("r50", (1.0, 0.5, 0.0), 0.2, 5e-4, 128, 25, 2, 1.0, "sgd", 8, MS1MV3),
    "ms1mv3_r50_onegpu": ("r50", (1.0, 0.5, 0.0), 0.02, 5e-4, 128, 20, 0, 1.0, "sgd", 1, MS1MV3),
    "ms1mv3_r100": ("r100", (1.0, 0.5, 0.0), 0.2, 5e-4, 128, 25, 0, 1.0, "sgd", 8, MS1MV3),
    "glint360k_r100": ("r100", (1.0, 0.0, 0.4), 0.1, 1e-4, 128, 20, 0, 1.0, "sgd", 8, GLINT),
    "wf42m_pfc02_r100": ("r100", (1.0, 0.0, 0.4), 0.2, 5e-4, 128, 20, 2, 0.2, "sgd", 16, WF42M),
    "wf42m_pfc03_r200": ("r200", (1.0, 0.0, 0.4), 0.4, 5e-4, 128, 20, 2, 0.3, "sgd", 32, WF42M),
    "wf42m_pfc03_vit_l": ("vit_l_dp005_mask_005", (1.0, 0.0, 0.4), 0.001, 0.1, 384, 40, 4, 0.3, "adamw", 64,
                          WF42M),
}
# the shipped YAMLs whose source is not <recipe>.py; wf42m_pfc02_r100.py is the 8-GPU variant (lr 0.1, no
# warm-up), the shipped recipe launches on 2 nodes = 16 GPUs and so mirrors _16gpus.py (lr 0.2, warm-up 2)
SOURCES = {"wf42m_pfc02_r100": "wf42m_pfc02_r100_16gpus", "wf42m_pfc03_r200": "wf42m_pfc03_32gpu_r200",
           "wf42m_pfc03_vit_l": "wf42m_pfc03_40epoch_64gpu_vit_l"}
# arcface_torch network name -> (facescale model.name, drop_path_rate, mask_ratio) where it is a ViT variant
VIT_VARIANTS = {"vit_l_dp005_mask_005": ("vit_l", 0.05, 0.05)}


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps({}))
    for name in ("lfw", "cfp_fp", "agedb_30"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("recipe", sorted(ARCFACE_TORCH))
def test_recipe_resolves_to_arcface_torch_values(recipe: str, data_dir: Path) -> None:
    network, margin, lr, wd, batch, epochs, warmup, rate, optimizer, gpus, images = ARCFACE_TORCH[recipe]
    header = Path(f"configs/{recipe}.yaml").read_text().split("\nmodel:")[0]
    source = f"recognition/arcface_torch/configs/{SOURCES.get(recipe, recipe)}.py"
    assert source in header.replace("\n# ", " ") and "Deliberate differences" in header
    cfg = load_config(f"configs/{recipe}.yaml", [f"data.shards={data_dir}"])
    resolve_schedule(cfg, world_size=gpus, num_samples=images)

    name, drop_path, mask = VIT_VARIANTS.get(network, (network, None, None))
    assert (cfg.model.name, cfg.model.drop_path_rate, cfg.model.mask_ratio) == (name, drop_path, mask)
    assert cfg.model.embedding_size == 512
    m = cfg.head.margin
    assert (m.m1, m.m2, m.m3, m.s) == (*margin, 64.0)
    assert m.type == ("cosface" if margin[2] else "arcface_straight_through")
    assert cfg.head.sample_rate == rate and cfg.head.update == "dense"
    assert cfg.optim.lr == lr and cfg.head.lr_scale == 1.0
    assert cfg.optim.name == cfg.head.optimizer == optimizer
    assert cfg.optim.weight_decay == cfg.head.weight_decay == wd
    if optimizer == "sgd":
        assert cfg.optim.momentum == cfg.head.momentum == 0.9
    assert cfg.optim.grad_clip == 5.0 and cfg.schedule.power == 1.0
    # arcface_torch: total_batch = batch_size * world_size; steps = num_image // total_batch * epochs
    assert cfg.schedule.global_batch_size == batch * gpus
    assert cfg.schedule.steps == images // (batch * gpus) * epochs
    assert cfg.schedule.warmup_steps == images // (batch * gpus) * warmup
    assert cfg.schedule.seed == 2048


def test_eval_bins_names_resolve_in_the_data_directory(data_dir: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("sets") / "mine.bin"
    elsewhere.write_bytes(b"")
    cfg = load_config("configs/ms1mv3_r50.yaml", [f"data.shards={data_dir}", f"eval.bins=[lfw, {elsewhere}]"])
    assert cfg.eval.bins == [str(data_dir / "lfw.bin"), str(elsewhere)]
    (data_dir / "cfp_fp.bin").unlink()
    with pytest.raises(Exception, match=r"eval.bins\[1\].*'lfw' means <data.shards>/lfw.bin"):
        load_config("configs/ms1mv3_r50.yaml", [f"data.shards={data_dir}"])
