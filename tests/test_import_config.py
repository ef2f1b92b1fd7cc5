"""`facescale import-config`: an arcface_torch EasyDict config becomes a YAML resolving to the same recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from facescale.cli import main
from facescale.config.arcface_import import read_arcface_config
from facescale.config.load import load_config
from facescale.config.schedule_resolve import resolve_schedule

ARCFACE_STYLE = '''from easydict import EasyDict as edict

# make training faster
config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_b_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 96
config.lr = 0.05 * 2
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 30
config.warmup_epoch = config.num_epoch // 10
config.val_targets = ['lfw', "cfp_fp"]
config.using_wandb = True
config.wandb_key = "secret-key"
config.wandb_project = "faces"
'''


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    out = tmp_path / "WebFace42M"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({}))
    for name in ("lfw", "cfp_fp"):
        (out / f"{name}.bin").write_bytes(b"")
    return out


def test_imported_yaml_validates_and_resolves_to_the_same_recipe(tmp_path, data_dir, capsys) -> None:
    source = tmp_path / "wf42m_vit_b.py"
    source.write_text(ARCFACE_STYLE)
    out = tmp_path / "wf42m_vit_b.yaml"
    assert main(["import-config", str(source), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert "ignored num_classes = 2059906" in text and "secret-key" not in text
    assert "convert rec --rec /train_tmp/WebFace42M/train.rec" in text
    assert "convert folder --root /train_tmp/WebFace42M --out data/webface42m" in text  # the folder release

    cfg = load_config(out, [f"data.shards={data_dir}"])
    assert cfg.eval.bins == [str(data_dir / "lfw.bin"), str(data_dir / "cfp_fp.bin")]
    resolve_schedule(cfg, world_size=8, num_samples=42474557)
    assert cfg.optim.lr == pytest.approx(0.1) and cfg.optim.name == cfg.head.optimizer == "sgd"
    assert cfg.schedule.global_batch_size == 96 * 8  # 96 per GPU
    per_epoch = 42474557 // (96 * 8)
    assert (cfg.schedule.steps, cfg.schedule.warmup_steps) == (per_epoch * 30, per_epoch * 3)
    m = cfg.head.margin
    assert (m.type, m.m1, m.m2, m.m3, m.s) == ("cosface", 1.0, 0.0, 0.4, 64.0)
    assert cfg.head.sample_rate == 0.3 and cfg.optim.weight_decay == cfg.head.weight_decay == 5e-4
    assert (cfg.model.name, cfg.model.drop_path_rate, cfg.model.mask_ratio) == ("vit_b", 0.05, 0.05)
    assert cfg.deepspeed.precision == "bf16" and cfg.schedule.seed == 2048  # base.py's seed
    assert cfg.deepspeed.zero_stage == 0  # arcface_torch trains with DDP
    assert cfg.logging.wandb.project == "faces"


def test_gpus_option_writes_the_global_batch(tmp_path, data_dir, capsys) -> None:
    source = tmp_path / "c.py"
    source.write_text(ARCFACE_STYLE)
    assert main(["import-config", str(source), "--gpus", "16"]) == 0
    out = tmp_path / "c.yaml"
    out.write_text(capsys.readouterr().out)
    cfg = load_config(out, [f"data.shards={data_dir}"])
    assert cfg.schedule.global_batch_size == 96 * 16 and cfg.schedule.batch_per_rank == 0


@pytest.mark.parametrize(("line", "message"), [
    ("config.fancy_loss = 'magface'", "key(s) fancy_loss have no facescale mapping"),
    ("config.lr = __import__('os').system('touch pwned')", "is not a literal, arithmetic or an earlier"),
    ("import os\nos.system('touch pwned')", "is not a `config.key = value` line"),
    ("config.network = 'r2060'", "network 'r2060' has no facescale backbone"),
    ("config.warmup_epoch = config.max_epoch // 10", "config.max_epoch is read before it is set"),
])
def test_unknown_or_unsafe_lines_are_refused_by_name(tmp_path, capsys, monkeypatch, line, message) -> None:
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "bad.py"
    source.write_text(ARCFACE_STYLE + line + "\n")
    assert main(["import-config", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facescale import-config: error:") and message in err
    assert not (tmp_path / "pwned").exists()


ARCFACE_STYLE_LINES = 27  # a line appended to ARCFACE_STYLE is line 28


@pytest.mark.timeout(60)  # the old evaluator computed 10 ** 10 ** 8 for as long as it took
@pytest.mark.parametrize(("line", "message"), [
    ("config.lr = 10 ** 10 ** 8", "'10 ** 10 ** 8' is larger than 256 bits"),
    ("config.output = 'x' * 10 ** 12", "'x' * 10 ** 12' has over 10000 characters or items"),
    ("config.notes = [[0] * 10000] * 10000", "has over 10000 characters or items"),  # printed in the notes
    ("config.lr = 1 / 0", "'1 / 0' cannot be computed (division by zero)"),
    ("config.lr = 10.0 ** 400", "'10.0 ** 400' cannot be computed"),
    ("config.lr = 'a' - 1", "''a' - 1' is arithmetic on a non-number"),
    ("config.lr = -'a'", "is arithmetic on a non-number"),
    ("config.notes = '%0999999999d' % 1", "is arithmetic on a non-number"),  # string formatting
    ("config.notes = {[1]: 2}", "'{[1]: 2}' cannot be computed (unhashable type: 'list')"),
    ("config.output = ['runs']", "config.output = ['runs'] is not a string or None"),
    ("config.num_epoch = '20'", "config.num_epoch = '20' is not a number"),
    ("config.warmup_epoch = '1'", "config.warmup_epoch = '1' is not a number"),
    ("config.embedding_size = 'big'", "config.embedding_size = 'big' is not an integer"),
    ("config.batch_size = True", "config.batch_size = True is not an integer"),
    ("config.sample_rate = None", "config.sample_rate = None is not a number"),
    ("config.fp16 = 'yes'", "config.fp16 = 'yes' is not True or False"),
    ("config.network = ['r50']", "config.network = ['r50'] is not a string"),
    ("config.margin_list = ('a', 0.5, 0)", "config.margin_list = ('a', 0.5, 0) is not (m1, m2, m3)"),
    ("config.margin_list = (1.0, 0.5)", "is not (m1, m2, m3) of numbers"),
    ("config.val_targets = 5", "config.val_targets = 5 is not a list of names"),
])
def test_hostile_or_mistyped_values_are_refused_by_line_and_key(tmp_path, capsys, line, message) -> None:
    """Each is one error line naming the file's line, at once: no traceback, hang or run_dir "['runs']"."""
    source = tmp_path / "bad.py"
    source.write_text(ARCFACE_STYLE + line + "\n")
    assert main(["import-config", str(source)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"error: {source}:{ARCFACE_STYLE_LINES + 1}: " in captured.err and message in captured.err


NESTED = ": not valid Python: an expression nested too deeply to parse"


@pytest.mark.parametrize(("text", "message"), [
    (b"\xff\xfe config = 1\n", ":1: not valid Python: (unicode error) 'utf-8' codec can't decode byte 0xff"),
    (b"config = edict()\x00\n", ": not valid Python: source code string cannot contain null bytes"),
    (("config.lr = " + "+".join(["1"] * 100_000) + "\n").encode(), NESTED),
    (("config.lr = " + "-" * 100_000 + "1\n").encode(), NESTED),
])
def test_a_file_python_cannot_parse_is_one_line(tmp_path, capsys, text, message) -> None:
    """Undecodable bytes, a null byte, an expression past the parser's depth: one line, no traceback."""
    source = tmp_path / "bad.py"
    source.write_bytes(text)
    assert main(["import-config", str(source)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"error: {source}{message}" in err


def test_recipe_arithmetic_within_the_bounds_is_computed(tmp_path) -> None:
    source = tmp_path / "sums.py"
    source.write_text("config = edict()\nconfig.seed = 2 ** 32 - 1\nconfig.rec = '/train_tmp/' + 'ms1m'\n"
                      "config.lr = 0.1 * 2 ** -1\nconfig.val_targets = ['lfw'] * 3\n"
                      "config.notes = 'x' * 10000\n")
    values = read_arcface_config(source)
    assert (values["seed"], values["rec"], values["lr"]) == (4294967295, "/train_tmp/ms1m", 0.05)
    assert values["val_targets"] == ["lfw", "lfw", "lfw"] and len(values["notes"]) == 10000


def test_base_defaults_fill_missing_keys(tmp_path) -> None:
    source = tmp_path / "tiny.py"
    source.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.network = 'mbf'\n")
    values = read_arcface_config(source)
    assert values["network"] == "mbf" and values["lr"] == 0.1 and values["margin_list"] == (1.0, 0.5, 0.0)


def test_synthetic_rec_names_the_synth_command_that_writes_its_shards(tmp_path, capsys) -> None:
    """arcface_torch's rec = "synthetic" (its speed-test configs) is random images, no folder to convert."""
    source = tmp_path / "speed.py"
    source.write_text(ARCFACE_STYLE.replace('"/train_tmp/WebFace42M"', '"synthetic"'))
    assert main(["import-config", str(source)]) == 0
    header = [line[1:].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert not any("facescale convert" in line for line in header)
    command = next(line for line in header if line.startswith("facescale synth")).split()
    assert command == ["facescale", "synth", "--out", "data/synthetic", "--identities", "2059906"]
    out = tmp_path / "synthetic"  # the named command runs, at a test's size
    assert main([*command[1:3], str(out), "--identities", "4", "--images-per-identity", "2"]) == 0
    assert (out / "manifest.json").is_file()


def _imported(tmp_path: Path, text: str, *args: str) -> str:
    """The header (comment lines joined by spaces) of the YAML `facescale import-config` writes for `text`."""
    source = tmp_path / "recipe.py"
    source.write_text(text)
    out = tmp_path / "recipe.yaml"
    assert main(["import-config", str(source), "--out", str(out), *args]) == 0
    return " ".join(line[1:].strip() for line in out.read_text().splitlines() if line.startswith("#"))


def test_a_negative_warmup_epoch_is_no_warm_up(tmp_path, data_dir) -> None:
    """arcface_torch's 3millions.py sets warmup_epoch = -1: a negative warmup_step, i.e. no warm-up at all."""
    text = ARCFACE_STYLE.replace("config.num_epoch // 10", "-1")
    assert "warmup_epoch = -1 -> schedule.warmup_epochs: 0" in _imported(tmp_path, text)
    cfg = load_config(tmp_path / "recipe.yaml", [f"data.shards={data_dir}"])
    resolve_schedule(cfg, world_size=8, num_samples=42474557)
    assert cfg.schedule.warmup_steps == 0 and cfg.schedule.steps == 42474557 // (96 * 8) * 30


# margin_list -> arcface_torch's CombinedMarginLoss target logit for cosine c: cos(theta + m2) when m1 = 1 and
# m3 = 0, else c - m3 whenever m3 > 0 (m1 and m2 unread); the unread values the note names
MARGINS = {
    (1.0, 0.5, 0.0): (lambda c: torch.cos(torch.acos(c) + 0.5), ""),
    (1.0, 0.3, 0.2): (lambda c: c - 0.2, "never reading m2 = 0.3"),
    (1.2, 0.0, 0.4): (lambda c: c - 0.4, "never reading m1 = 1.2"),
    (1.35, 0.5, 0.35): (lambda c: c - 0.35, "never reading m1 = 1.35 and m2 = 0.5"),
}


@pytest.mark.parametrize("margin", sorted(MARGINS))
def test_margin_list_imports_as_arcface_torch_computes_it(tmp_path, data_dir, margin) -> None:
    from facescale.heads.margins import build_margin

    expected, unread = MARGINS[margin]
    header = _imported(tmp_path, ARCFACE_STYLE.replace("(1.0, 0.0, 0.4)", repr(margin)))
    assert unread in header and ("never reading" in header) == bool(unread)
    cfg = load_config(tmp_path / "recipe.yaml", [f"data.shards={data_dir}"])
    cos = torch.linspace(-0.3, 0.99, 50, dtype=torch.float64)
    got = build_margin(cfg.head.margin).target_margin(cos)
    torch.testing.assert_close(got, expected(cos))


@pytest.mark.parametrize("margin", [(1.35, 0.0, 0.0), (1.0, 0.5, -0.1), (0.9, 0.2, 0.0)])
def test_a_margin_list_arcface_torch_raises_for_is_refused(tmp_path, capsys, margin) -> None:
    source = tmp_path / "sphere.py"
    source.write_text(ARCFACE_STYLE.replace("(1.0, 0.0, 0.4)", repr(margin)))
    assert main(["import-config", str(source)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{source}: margin_list {margin!r}" in err
    assert "CombinedMarginLoss raises for it" in err


def test_sgd_momentum_is_arcface_torchs_fixed_0_9(tmp_path, data_dir) -> None:
    """train_v2.py builds torch.optim.SGD(..., momentum=0.9): config.momentum = 0.8 is never read."""
    header = _imported(tmp_path, ARCFACE_STYLE.replace("config.momentum = 0.9", "config.momentum = 0.8"))
    assert "momentum = 0.8 -> optim.momentum and head.momentum: 0.9" in header
    cfg = load_config(tmp_path / "recipe.yaml", [f"data.shards={data_dir}"])
    assert cfg.optim.name == cfg.head.optimizer == "sgd" and cfg.optim.momentum == cfg.head.momentum == 0.9
    assert "momentum = 0.9 ->" not in _imported(tmp_path, ARCFACE_STYLE)  # a note only where they differ


@pytest.mark.parametrize(("drop", "named"), [
    (("config.num_epoch = 30\n", "config.warmup_epoch = config.num_epoch // 10\n"),
     "config.num_epoch and config.warmup_epoch are not set"),
    (("config.warmup_epoch = config.num_epoch // 10\n",), "config.warmup_epoch is not set"),
])
def test_a_config_without_epochs_is_refused(tmp_path, capsys, drop, named) -> None:
    """base.py sets no num_epoch / warmup_epoch, arcface_torch's train_v2.py reads both: no silent default."""
    text = ARCFACE_STYLE
    for line in drop:
        assert line in text
        text = text.replace(line, "")
    source = tmp_path / "noepoch.py"
    source.write_text(text)
    assert main(["import-config", str(source)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"{source}: {named}" in captured.err


# gradient_acc -> (logging.every_steps, eval.every_steps) for frequent = 10, verbose = 2000: arcface_torch
# logs and evaluates every that many batches: every 10 / acc, 2000 / acc optimizer steps (nearest, >= 1)
EVERY = {1: (10, 2000), 3: (3, 667), 40: (1, 50)}


@pytest.mark.parametrize("acc", sorted(EVERY))
def test_frequent_and_verbose_count_optimizer_steps_under_gradient_acc(tmp_path, data_dir, acc) -> None:
    text = ARCFACE_STYLE + f"config.gradient_acc = {acc}\nconfig.frequent = 10\n"
    header = _imported(tmp_path, text)
    assert ("facescale in optimizer steps of gradient_acc" in header) == (acc > 1)
    cfg = load_config(tmp_path / "recipe.yaml", [f"data.shards={data_dir}"])
    assert (cfg.logging.every_steps, cfg.eval.every_steps) == EVERY[acc]
    assert cfg.schedule.grad_accumulation == acc


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradient_acc_steps_as_arcface_torchs_summed_gradients(tmp_path, data_dir, optimizer) -> None:
    """train_v2.py calls loss.backward() on each of gradient_acc batches (gradients add up) and clips the sum
    at 5; facescale averages the batches. The imported settings, run the facescale way, take the same steps
    (the batches' scales vary, so the clip binds on some steps and not on others)."""
    acc = 3
    text = ARCFACE_STYLE + f"config.gradient_acc = {acc}\nconfig.optimizer = '{optimizer}'\n"
    _imported(tmp_path, text)
    cfg = load_config(tmp_path / "recipe.yaml", [f"data.shards={data_dir}"])
    assert cfg.schedule.grad_accumulation == acc and cfg.head.weight_decay == cfg.optim.weight_decay
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=gen)
    batches = [torch.randn(5, 4, generator=gen) * (0.2 + i % 5) for i in range(5 * acc)]

    def run(lr: float, wd: float, clip: float, mean: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(start.clone())
        opt = (torch.optim.SGD([weight], lr=lr, momentum=0.9, weight_decay=wd) if optimizer == "sgd"
               else torch.optim.AdamW([weight], lr=lr, weight_decay=wd))
        for i, batch in enumerate(batches):
            loss = (batch @ weight.t()).square().mean()
            (loss / acc if mean else loss).backward()
            if (i + 1) % acc == 0:
                torch.nn.utils.clip_grad_norm_([weight], clip)
                opt.step()
                opt.zero_grad()
        return weight.detach()

    arcface_torch = run(0.1, 5e-4, 5.0, mean=False)  # ARCFACE_STYLE's lr and weight decay
    facescale = run(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, mean=True)
    torch.testing.assert_close(facescale, arcface_torch, rtol=1e-5, atol=1e-6)


def arcface_torch_lr(batch: int, lr: float, warmup: int, total: int) -> float:
    """arcface_torch's PolynomialLRWarmup (power 1) at `batch` as train_v2.py steps it (after each batch):
    its constructor's step leaves last_epoch 0, for which get_lr returns the optimizer's lr unchanged."""
    if batch == 0:
        return lr
    if batch <= warmup:
        return lr * batch / warmup
    return lr * (1 - (min(batch, total) - warmup) / (total - warmup))


def test_the_notes_say_how_facescales_warm_up_differs(tmp_path) -> None:
    """facescale's warm-up is arcface_torch's one batch earlier (without its first batch at the full lr)."""
    from facescale.config.schema import ScheduleConfig
    from facescale.train.schedule import lr_at

    words = "warm-up runs step s at lr*(s+1)/warmup_steps (arcface_torch's scheduler runs its first batch"
    header = _imported(tmp_path, ARCFACE_STYLE).replace("\n# ", " ")
    assert words in header
    shipped = Path("configs/ms1mv3_r50.yaml").read_text().replace("\n# ", " ").replace("\n#   ", " ")
    assert words in shipped  # the same words
    sch = ScheduleConfig(steps=50, warmup_steps=10, power=1.0)  # as import-config writes it
    ours = [lr_at(s, 0.1, sch) for s in range(50)]
    theirs = [arcface_torch_lr(b, 0.1, 10, 50) for b in range(51)]
    assert ours[:10] == pytest.approx(theirs[1:11]) and ours[10:] == pytest.approx(theirs[10:50])
    assert theirs[0] == 0.1 and ours[0] == pytest.approx(0.01)


@pytest.mark.parametrize(("classes", "images", "shards", "plan_names"), [
    (85742, 5822653, "data/ms1mv2", "85,742 identities"),  # ms1mv2_*.py: rec /train_tmp/faces_emore
    (1017970, 12720066, "data/WebFace12M_Conflict", None),  # wf12m_conflict_*.py: not a set plan knows
])
def test_a_known_sets_shards_are_named_so_plan_sizes_it_before_conversion(tmp_path, capsys, classes, images,
                                                                          shards, plan_names) -> None:
    text = (ARCFACE_STYLE.replace("config.num_classes = 2059906", f"config.num_classes = {classes}")
            .replace("config.num_image = 42474557", f"config.num_image = {images}")
            .replace("/train_tmp/WebFace42M", "/train_tmp/WebFace12M_Conflict" if not plan_names else "/d/x"))
    _imported(tmp_path, text)
    yaml_text = (tmp_path / "recipe.yaml").read_text()
    assert f"shards: {shards}" in yaml_text and f"--out {shards}" in yaml_text
    capsys.readouterr()
    code = main(["plan", "--config", str(tmp_path / "recipe.yaml"), "--nodes", "1", "--gpus-per-node", "8"])
    if plan_names:
        assert code == 0 and plan_names in capsys.readouterr().out
    else:
        assert code == 2 and "pass --num-classes N" in capsys.readouterr().err
