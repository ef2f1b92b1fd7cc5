"""schedule.epochs / warmup_epochs / batch_per_rank: arcface_torch's way of writing a schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from facescale.config.load import ConfigError, load_config
from facescale.config.schedule_resolve import resolve_schedule


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from facescale.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=10, images_per_identity=5, holdout_identities=2, seed=1, verify_pairs=10)
    return out  # 50 training samples


def test_ms1mv3_r50_on_8_gpus_gives_arcface_torchs_step_counts(shards) -> None:
    cfg = load_config(None, [f"data.shards={shards}", "schedule.epochs=25", "schedule.warmup_epochs=2",
                             "schedule.batch_per_rank=128"])
    line = resolve_schedule(cfg, world_size=8, num_samples=5179510)
    # arcface_torch: total_step = num_image // (batch_size * world_size) * num_epoch
    sch = cfg.schedule
    assert (sch.global_batch_size, sch.steps, sch.warmup_steps) == (1024, 126450, 10116)
    assert "25 epochs x 5058 steps" in line and "128 per rank x 8 ranks" in line
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.batch_per_rank) == (0, 0, 0)


def test_epochs_are_counted_from_the_manifest(shards) -> None:
    cfg = load_config(None, [f"data.shards={shards}", "schedule.epochs=3", "schedule.global_batch_size=8"])
    resolve_schedule(cfg, world_size=2)
    assert cfg.schedule.steps == 3 * (50 // 8)


@pytest.mark.parametrize(("first", "second"), [
    ("steps=10", "epochs=2"), ("warmup_steps=1", "warmup_epochs=1"),
    ("global_batch_size=64", "batch_per_rank=8")])
def test_both_keys_of_a_pair_are_refused(shards, first: str, second: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.shards={shards}", f"schedule.{first}", f"schedule.{second}"])
    a, b = first.split("=")[0], second.split("=")[0]
    assert f"schedule.{a} and schedule.{b} are both set" in str(err.value) and "exactly one" in str(err.value)


def test_too_few_samples_for_one_step_is_named(shards) -> None:
    cfg = load_config(None, [f"data.shards={shards}", "schedule.epochs=1", "schedule.batch_per_rank=64"])
    with pytest.raises(ConfigError, match="schedule.epochs: 50 samples make no full step"):
        resolve_schedule(cfg, world_size=2)
