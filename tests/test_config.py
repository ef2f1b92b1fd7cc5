"""Config loading: typos, wrong types and impossible values fail early with the file, key and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facescale.config import ConfigError, load_config
from facescale.config.deepspeed import deepspeed_json
from facescale.config.load import config_yaml, load_config_text
from facescale.config.validate import validate


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"num_classes": 10}))
    return d


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def base(shard_dir: Path) -> str:
    return f"model: {{name: demo}}\ndata: {{shards: {shard_dir}}}\n"


def test_valid_config_and_override(tmp_path, shard_dir):
    cfg = load_config(write(tmp_path, base(shard_dir)), ["head.sample_rate=0.3", "schedule.steps=7"])
    assert cfg.head.sample_rate == 0.3 and cfg.schedule.steps == 7
    assert cfg.model.name == "demo"


def test_typo_gets_suggestion_and_file(tmp_path, shard_dir):
    p = write(tmp_path, base(shard_dir) + "head: {sample_rat: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "head" in msg and "sample_rat" in msg and "did you mean 'sample_rate'" in msg


def test_unknown_section(tmp_path, shard_dir):
    """A top-level key is named right after the file (no empty section between)."""
    path = write(tmp_path, base(shard_dir) + "optimm: {lr: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: unknown key 'optimm'; did you mean 'optim'?"


def test_wrong_type(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match=r"schedule\.steps: expected an integer"):
        load_config(write(tmp_path, base(shard_dir)), ["schedule.steps=many"])


def test_sample_rate_out_of_range(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match=r"head\.sample_rate: 1\.5 is outside \[0, 1\]"):
        load_config(write(tmp_path, base(shard_dir)), ["head.sample_rate=1.5"])


def test_read_timeout_must_leave_the_other_ranks_time_to_wait(tmp_path, shard_dir):
    path = write(tmp_path, base(shard_dir))
    with pytest.raises(ConfigError, match=r"data\.read_timeout_s: 300\.0 must be 0 \(wait for ever\) or "
                                          r"positive and shorter than dist\.timeout_s \(120\.0\)"):
        load_config(path, ["dist.timeout_s=120"])
    assert load_config(path, ["dist.timeout_s=120", "data.read_timeout_s=60"]).data.read_timeout_s == 60
    assert load_config(path, ["dist.timeout_s=120", "data.read_timeout_s=0"]).data.read_timeout_s == 0


def test_a_path_under_home_is_expanded(tmp_path, shard_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(Path(shard_dir).parent))
    cfg = load_config(write(tmp_path, base(shard_dir)), [f"data.shards=~/{Path(shard_dir).name}",
                                                         "logging.run_dir=~/runs/x"])
    assert cfg.data.shards == str(shard_dir) and cfg.logging.run_dir == f"{Path(shard_dir).parent}/runs/x"


def test_missing_shard_dir_names_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.shards: directory .* does not exist.*facescale synth"):
        load_config(write(tmp_path, "data: {shards: /nonexistent/x}\n"))


def test_batch_not_divisible_by_world(tmp_path, shard_dir):
    cfg = load_config(write(tmp_path, base(shard_dir)), ["schedule.global_batch_size=100"])
    with pytest.raises(ConfigError, match=r"global_batch_size: 100 is not divisible by world size 3"):
        validate(cfg, "x.yaml", world_size=3)
    validate(cfg, "x.yaml", world_size=2)


def test_unknown_backbone_suggests(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match="Did you mean 'r50'"):
        load_config(write(tmp_path, base(shard_dir)), ["model.name=r5O"])


def test_bad_choice(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match=r"head\.update: 'sparce'.*did you mean 'sparse'"):
        load_config(write(tmp_path, base(shard_dir)), ["head.update=sparce"])


def test_a_choice_far_from_every_value_lists_them_once(tmp_path, shard_dir):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, base(shard_dir)), ["data.reader=nvidia"])
    assert caught.value.line().endswith(
        "data.reader: 'nvidia' is not one of auto, dali, webdataset; fix the config file or the --set value")
    with pytest.raises(ConfigError, match=r"unknown backbone 'foo'\. Known backbones: demo, .*, vit_t \(a"):
        load_config(write(tmp_path, base(shard_dir)), ["model.name=foo"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_resolved_config_round_trips(tmp_path, shard_dir):
    cfg = load_config(write(tmp_path, base(shard_dir)), ["optim.betas=[0.8, 0.9]", "eval.bins=[]"])
    again = load_config_text(config_yaml(cfg), "saved.yaml")
    assert again == cfg


def test_shipped_configs_parse():
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config_text(path.read_text(), str(path))


def test_deepspeed_json_follows_config(tmp_path, shard_dir):
    cfg = load_config(
        write(tmp_path, base(shard_dir)),
        ["schedule.global_batch_size=256", "schedule.grad_accumulation=2", "deepspeed.zero_stage=2"],
    )
    ds = deepspeed_json(cfg, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"]["enabled"] and "fp16" not in ds
    assert (
        ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 4 * ds["gradient_accumulation_steps"]
    )
    assert "torch_autocast" not in deepspeed_json(cfg, 4, "fp32")


def test_old_f2c_names_load_as_the_new_ones_with_a_warning(tmp_path, shard_dir):
    """`head.type: dcp` and `head.dcp` (the names before f2c) keep loading; the warning names the fix."""
    old = base(shard_dir) + "head: {type: dcp, dcp: {queue_size: 77, pool: sharded}}\n"
    with pytest.warns(FutureWarning, match=r"head\.type 'dcp' is now 'f2c'"):
        cfg = load_config(write(tmp_path, old), ["head.dcp.momentum=0.5"])
    assert cfg.head.type == "f2c"
    assert (cfg.head.f2c.queue_size, cfg.head.f2c.pool, cfg.head.f2c.momentum) == (77, "sharded", 0.5)
    with pytest.warns(FutureWarning, match=r"head\.dcp is now head\.f2c"):
        saved = load_config_text("head: {type: dcp, dcp: {queue_size: 5}}\n", "step_1/config.yaml")
    assert saved.head.type == "f2c" and saved.head.f2c.queue_size == 5
    assert "dcp" not in config_yaml(saved)


def test_every_choice_is_checked_where_it_is_declared(tmp_path, shard_dir):
    """Each `Literal` field of the schema refuses an unknown value at load time, naming key and choices."""
    import dataclasses
    import typing

    from facescale.config.schema import Config

    def literal_keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from literal_keys(hints[f.name], f"{prefix}{f.name}.")
            elif typing.get_origin(hints[f.name]) is typing.Literal:
                yield f"{prefix}{f.name}", typing.get_args(hints[f.name])

    keys = dict(literal_keys(Config))
    assert {"data.reader", "head.margin.type", "head.f2c.pool", "deepspeed.precision"} <= set(keys)
    for key, allowed in keys.items():
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, base(shard_dir)), [f"{key}=bogus"])
        assert key in str(e.value) and all(a in str(e.value) for a in allowed)


@pytest.mark.parametrize("key", ["gradient_accumulation_steps", "gradient_predivide_factor",
                                 "prescale_gradients", "train_batch_size", "gradient_allreduce_op"])
def test_deepspeed_extra_keys_that_change_gradient_scaling_are_refused_by_name(tmp_path, shard_dir, key):
    """The surrogate backward scales by W x grad_accumulation; extra keys that change DeepSpeed's batch or
    averaging behind it are refused at load time, naming the key and the setting to use."""
    with pytest.raises(ConfigError, match=rf"deepspeed\.extra\.{key}"):
        load_config(write(tmp_path, base(shard_dir)), [f"deepspeed.extra.{key}=2"])
    cfg = load_config(write(tmp_path, base(shard_dir)), ["deepspeed.extra.steps_per_print=5"])
    assert deepspeed_json(cfg, 1, "fp32")["steps_per_print"] == 5  # other expert knobs still pass through


def test_deepspeed_extra_zero_stage_and_unknown_keys_are_refused_by_name(tmp_path, shard_dir):
    """The ZeRO stage belongs to deepspeed.zero_stage (which the [plan] line reports), and DeepSpeed ignores a
    top-level key it does not know, so a misspelt one would be silently unread: both are refused at load."""
    path = write(tmp_path, base(shard_dir))
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["deepspeed.extra={zero_optimization: {stage: 2}}"])
    assert "deepspeed.extra.zero_optimization.stage:" in str(caught.value)
    assert "set deepspeed.zero_stage" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["deepspeed.extra={zero_optimisation: {stage: 2}}"])
    assert "deepspeed.extra.zero_optimisation: not a DeepSpeed config key" in str(caught.value)
    assert "did you mean 'zero_optimization'?" in str(caught.value)
    cfg = load_config(path, ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    assert deepspeed_json(cfg, 1, "fp32")["zero_optimization"] == {
        "stage": 1, "overlap_comm": cfg.deepspeed.overlap_comm, "reduce_bucket_size": 1000}


def test_f2c_refuses_the_partial_fc_settings_it_does_not_read(tmp_path, shard_dir):
    """F2C has no class centers: a sample rate or a centers' optimizer given with it would be silently unread
    (the shipped webface42m_f2c.yaml carried five such keys, with a comment on the update mode)."""
    path = write(tmp_path, base(shard_dir) + "head: {type: f2c, sample_rate: 0.2, update: sparse}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.line().endswith(
        "head.sample_rate: head.type f2c has no class centers, so it reads none of the Partial FC settings; "
        "remove head.sample_rate, head.update (F2C reads head.margin and head.f2c)")
    assert load_config(path, ["head.sample_rate=1.0", "head.update=dense"]).head.type == "f2c"


def test_two_eval_sets_with_one_name_are_refused_naming_both(tmp_path, shard_dir):
    bins = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        bins.append(tmp_path / folder / "lfw.bin")
        bins[-1].write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, base(shard_dir)), [f"eval.bins=[{bins[0]}, {bins[1]}]"])
    assert str(e.value).endswith(f"eval.bins[1]: '{bins[1]}' has the name 'lfw' of eval.bins[0] '{bins[0]}' "
                                 "(a set is named by its file name in TensorBoard tags, best accuracy and "
                                 "result.json); list each set once, and copy or rename a file that shares "
                                 "another's name")
    (tmp_path / "b" / "cfp_fp.bin").write_bytes(b"")
    cfg = load_config(write(tmp_path, base(shard_dir)), [f"eval.bins=[{bins[0]}, {tmp_path}/b/cfp_fp.bin]"])
    assert len(cfg.eval.bins) == 2
