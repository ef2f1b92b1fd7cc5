"""`make gpu-check`: everything facescale can check on one CUDA GPU, in one command, with one summary table.

1. the `gpu` tests (tests/test_gpu.py, tests/test_head_syncs.py): runtime choices, head vs the CPU fp32
   oracle, no host sync in the head, DALI mixed decode, head memory vs `facescale plan`;
2. the head benchmark (benchmarks/head.py --device cuda): fp32 / bf16, C = 1M and 10M sampled at 0.1;
3. a short synthetic training run on the GPU: `facescale train` (DeepSpeed engine, 1 rank, NCCL) when
   DeepSpeed is installed, else the same backbone + head driven directly (no engine), on synthesized data.
Needs no network. Writes OUT/summary.md, OUT/gpu_check.json and each part's own output under OUT.

    python benchmarks/gpu_check.py --out runs/gpu_check            # on the GPU machine, from the repo root
    python benchmarks/gpu_check.py --dry-run --out runs/gpu_check  # anywhere: the non-CUDA parts, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_gpu.py", "tests/test_head_syncs.py"]


def has(module: str) -> bool:
    """Whether `module` can be imported (a missing parent package, e.g. `nvidia`, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run `cmd` from the repo root with its output in `log`; (exit code, seconds); 124 on timeout."""
    started = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    with log.open("w") as out:
        print("[gpu-check] " + " ".join(cmd), flush=True)
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - started


def test_rows(junit: Path) -> list[tuple[str, str, str]]:
    """(test, pass/FAIL/skip, reason) from pytest's junit XML."""
    rows = []
    if not junit.is_file():
        return [("pytest", "FAIL", "no report written (see pytest.log)")]
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        status, detail = "pass", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, detail = "FAIL", ((child.get("message") or "").splitlines() or [""])[0][:90]
            elif child.tag == "skipped":
                status, detail = "skip", (child.get("message") or "")[:90]
        rows.append((case.get("name", "?"), status, detail))
    return rows


def head_rows(result: Path) -> list[tuple[str, str, str]]:
    """One row per head benchmark case from its JSON (the fields benchmarks/head.py writes)."""
    if not result.is_file():
        return [("head benchmark", "FAIL", "no result (see head.log)")]
    rows = []
    data = json.loads(result.read_text())
    for case in data.get("results", data if isinstance(data, list) else []):
        name = (f"head C={case.get('classes')} B={case.get('batch')} r={case.get('rate')} "
                f"{case.get('mode')} {case.get('dtype')}")
        if case.get("skipped"):
            rows.append((name, "skip", str(case.get("skipped"))[:90]))
            continue
        if case.get("error"):
            rows.append((name, "FAIL", str(case["error"]).splitlines()[-1][:90]))
            continue
        step, ratio = (case.get("step_ms") or {}).get("med"), case.get("step_over_floor")
        peak = case.get("peak_over_theory")
        detail = f"step {step:.1f} ms" if isinstance(step, int | float) else "see head.md"
        if isinstance(ratio, int | float):
            detail += f", {ratio:.2f}x floor"
        if isinstance(peak, int | float):
            detail += f", peak {peak:.2f}x theory"
        rows.append((name, "ran", detail))
    return rows or [("head benchmark", "ran", "see head.md")]


def train_engine(choice: str) -> str:
    """"deepspeed" or "direct": `auto` takes DeepSpeed when it is installed."""
    if choice == "auto":
        return "deepspeed" if has("deepspeed") else "direct"
    if choice == "deepspeed" and not has("deepspeed"):
        raise SystemExit("[gpu-check] --train-engine deepspeed: DeepSpeed is not installed here; use auto")
    return choice


def training_command(args, data: Path, run_dir: Path) -> list[str]:
    """`facescale train` on one rank (DeepSpeed engine), or the engine-free loop below (`args.train_engine`,
    resolved by `train_engine`)."""
    if args.train_engine == "deepspeed":
        return [sys.executable, "-m", "facescale", "train", "--config", "configs/synthetic.yaml",
                "--set", f"data.shards={data}", "--set", f"logging.run_dir={run_dir}",
                "--set", f"schedule.steps={args.train_steps}",
                "--set", f"schedule.warmup_steps={min(5, args.train_steps - 1)}",
                "--set", "checkpoint.resume=none", "--set", "logging.tensorboard=false",
                "--set", f"data.reader={'dali' if has('nvidia.dali') else 'webdataset'}",
                "--set", f"eval.bins=[{data / 'verify.bin'}]", "--set", "logging.every_steps=10"]
    return [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--direct-train", str(data),
            "--train-steps", str(args.train_steps), "--out", str(run_dir)]


def direct_train(data: Path, steps: int, out: Path) -> None:
    """The backbone and head of configs/synthetic.yaml trained directly (no DeepSpeed): bf16 autocast on CUDA,
    the decoupled backward of facescale/train/step.py, torch SGD and the config's schedule for the backbone;
    writes result.json."""
    import torch

    from facescale.config.load import load_config
    from facescale.eval.extract import evaluate_bin
    from facescale.heads import build_head
    from facescale.models.registry import build_backbone
    from facescale.runtime import select_runtime
    from facescale.train.schedule import lr_at
    from facescale.train.trainer import build_backbone_optimizer

    cfg = load_config("configs/synthetic.yaml", [f"data.shards={data}", f"schedule.steps={steps}",
                                                 f"schedule.warmup_steps={min(5, steps - 1)}",
                                                 f"eval.bins=[{data / 'verify.bin'}]"])
    runtime = select_runtime(0, "auto")
    num_classes = json.loads((data / "manifest.json").read_text())["num_classes"]
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model).to(runtime.device)
    optimizer = build_backbone_optimizer(cfg, backbone.parameters())
    head = build_head(cfg.head, num_classes, cfg.model.embedding_size, seed=0, device=runtime.device)
    batches = _batches(cfg, data, runtime.device)
    losses, started = [], time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, cfg.optim.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        with torch.autocast(runtime.device.type, torch.bfloat16, enabled=runtime.precision == "bf16"):
            embeddings = backbone(images)
        detached = embeddings.detach().float().requires_grad_(True)
        head.zero_grad()
        loss, _ = head(detached, labels, step)
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        (embeddings.float() * detached.grad).sum().backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        head.optimizer_step(lr * cfg.head.lr_scale)
        losses.append(loss.detach())
    if runtime.is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    losses = [float(v) for v in losses]
    backbone.eval()
    scores = {}
    for path in cfg.eval.bins:  # the synthesized held-out identities (verify.bin), as `facescale train` does
        report = evaluate_bin(backbone, path, cfg.eval.batch_size, runtime.device,
                              image_size=cfg.data.image_size, progress=False)
        scores[report["name"]] = {k: report[k] for k in ("accuracy", "accuracy_std", "pixel_accuracy")}
    out.mkdir(parents=True, exist_ok=True)
    result = {"steps": steps, "first_loss": losses[0], "final_loss": losses[-1],
              "samples_per_s": steps * cfg.schedule.global_batch_size / wall, "eval": scores,
              "device": str(runtime.device), "precision": runtime.precision, "engine": "none (direct loop)"}
    (out / "result.json").write_text(json.dumps(result, indent=2))


def _batches(cfg, data: Path, device):
    """Endless batches from facescale's loader (DALI when installed, else the webdataset reader)."""
    from facescale.data.loader import build_train_loader

    loader = build_train_loader(cfg.data, rank=0, world_size=1, batch_size=cfg.schedule.global_batch_size,
                                seed=0, device=device)
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="no CUDA needed: tiny head sizes, CPU training run")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-engine", choices=("auto", "deepspeed", "direct"), default="auto",
                   help="the training run: `facescale train` (DeepSpeed) or the engine-free loop; auto: "
                   "DeepSpeed when installed")
    p.add_argument("--skip", nargs="*", default=[], choices=("tests", "head", "train"))
    p.add_argument("--direct-train", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.train_engine = train_engine(args.train_engine)  # before the tests: a missing DeepSpeed stops it now
    if args.direct_train:
        direct_train(args.direct_train, args.train_steps, args.out)
        return 0

    import torch

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("[gpu-check] no CUDA device here; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    env_line = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {device_name}, Python "
                f"{sys.version.split()[0]}; DeepSpeed {'yes' if has('deepspeed') else 'no'}, DALI "
                f"{'yes' if has('nvidia.dali') else 'no'}")
    rows: list[tuple[str, str, str]] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if "tests" not in args.skip:
        junit = out / "gpu_tests.xml"
        _, timings["tests"] = run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                   f"--junitxml={junit}", *GPU_TESTS],
                                  out / "pytest.log", timeout=240)
        rows += test_rows(junit)

    if "head" not in args.skip:
        # on CUDA the CPU only draws the centers' init: give it every core (a 10M-row shard is ~70 s on one)
        classes, extra = ((["1M", "10M"], ["--max-gib", "120", "--threads", str(os.cpu_count() or 2)])
                          if not args.dry_run else (["20000"], []))
        cmd = [sys.executable, "benchmarks/head.py", "--device", "cuda" if cuda else "cpu", "--classes",
               *classes, "--batch", "512", "--rates", "0.1", "--dtypes", "fp32", "bf16", "--baseline-steps",
               "0", "--out", str(out / "head"), *extra]
        code, timings["head"] = run(cmd, out / "head.log", timeout=240)
        rows += head_rows(out / "head.json") if code == 0 else [("head benchmark", "FAIL", f"exit {code}")]

    if "train" not in args.skip and not (has("webdataset") or has("nvidia.dali")):
        rows.append(("training run", "FAIL", "needs webdataset or DALI (wheels: benchmarks/gpu_wheels.sh)"))
    elif "train" not in args.skip:
        from facescale.data.synth import synthesize

        data = out / "synthetic"
        if not (data / "manifest.json").is_file():
            synthesize(data, identities=200, images_per_identity=16, holdout_identities=50, seed=7,
                       verify_pairs=600)
        run_dir = out / "train"
        steps = args.train_steps if not args.dry_run else 4
        args.train_steps = steps
        code, timings["train"] = run(training_command(args, data, run_dir), out / "train.log", timeout=180)
        result = run_dir / "result.json"
        if code == 0 and result.is_file():
            r = json.loads(result.read_text())
            acc = r.get("eval", {}).get("verify", {}).get("accuracy")
            detail = (f"{r['steps']} steps, loss {r.get('first_loss', float('nan')):.2f} -> "
                      f"{r['final_loss']:.2f}, {r['samples_per_s']:.0f} img/s" if "first_loss" in r else
                      f"{r['steps']} steps, final loss {r['final_loss']:.2f}, {r['samples_per_s']:.0f} img/s")
            if acc is not None:
                detail += f", held-out accuracy {100 * acc:.1f}%"
            engine = "DeepSpeed" if args.train_engine == "deepspeed" else "direct, no DeepSpeed"
            rows.append((f"training run ({engine})", "ran", detail))
        else:
            rows.append(("training run", "FAIL", f"exit {code} (see train.log)"))

    total = time.perf_counter() - started
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"# facescale gpu-check: {env_line}", "", f"| {'check':<{width}} | result | detail |",
             f"|{'-' * (width + 2)}|--------|--------|"]
    lines += [f"| {name:<{width}} | {status:<6} | {detail} |" for name, status, detail in rows]
    spent = ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
    lines += ["", f"seconds: {spent}, total {total:.0f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "summary.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env_line, "rows": rows, "seconds": timings,
                                                   "total_s": total}, indent=1))
    return 1 if any(status == "FAIL" for _, status, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
