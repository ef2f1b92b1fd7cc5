"""The README's quoted console lines and config sections are what the code prints and reads."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from facescale.cli import build_parser
from facescale.config.load import build_config
from facescale.config.schedule_resolve import resolve_schedule
from facescale.config.schema import Config
from facescale.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
README = " ".join((REPO / "README.md").read_text().split())  # one line: quotes wrap across lines
MS1MV3_IMAGES = 5179510  # the recipes' header comment: 5,179,510 images


def test_configuration_section_lists_every_config_section() -> None:
    listed = re.search(r"A run is one YAML file in `configs/` with sections (.*?) \(", README).group(1)
    assert re.findall(r"`(\w+)`", listed) == [f.name for f in dataclasses.fields(Config)]


def test_reading_the_console_quotes_what_its_recipe_prints() -> None:
    """The start-up schedule line and the example [train] line's lr are those of the recipe the text names."""
    recipe = re.search(r"\*\*Reading the console\.\*\* At start-up \(`configs/(\w+)\.yaml` on (\d+) GPUs\)",
                       README)
    path = REPO / "configs" / f"{recipe.group(1)}.yaml"
    cfg = build_config(yaml.safe_load(path.read_text()), [], str(path))
    assert f"`{resolve_schedule(cfg, int(recipe.group(2)), MS1MV3_IMAGES)}`" in README
    step, total, lr = re.search(r"`\[train\] step (\d+)/(\d+) epoch \S+ loss \S+ lr (\S+) ", README).groups()
    assert int(total) == cfg.schedule.steps
    assert lr == f"{lr_at(int(step) - 1, cfg.optim.lr, cfg.schedule):.4g}"  # logged after step `step - 1` ran


def test_eval_output_default_is_documented_and_ignored_by_git() -> None:
    """`eval verify` / `eval ijb` without --out write into the current directory: the README says where, and a
    run from the checkout leaves git clean."""
    parser = build_parser()
    defaults = {parser.parse_args(["eval", *argv, "--checkpoint", "run"]).out
                for argv in (["verify", "--bin", "lfw.bin"], ["ijb", "--root", "IJBC"])}
    (default,) = defaults
    assert README.count(f"(default `{default}/`") == 2
    assert f"/{default}/" in (REPO / ".gitignore").read_text().splitlines()
