"""`make demo`: synthesize identities if missing, train on several CPU ranks, print what was learned."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from facescale.commands import bounded_int
from facescale.errors import InputError, report_errors
from launcher.local import local_train_command

DATA = Path("data/synthetic")
PFC_CONFIG, F2C_CONFIG = "configs/synthetic.yaml", "configs/synthetic_f2c.yaml"
SYNTH = {"identities": 2000, "images_per_identity": 16, "holdout_identities": 300, "seed": 7,
         "image_size": 112}


def ensure_data(data_dir: Path) -> None:
    """Generate the demo's synthetic set once; later runs reuse it. A set its manifest says is another (e.g.
    `facescale synth` at other sizes or seed) would change the accuracy the README quotes: another synthetic
    set is regenerated, anything else is refused."""
    from facescale.data.manifest import MANIFEST_NAME, Manifest
    from facescale.data.synth import VERIFY_NAME, synth_source, synthesize

    want = synth_source(SYNTH["seed"], SYNTH["identities"], SYNTH["images_per_identity"],
                        SYNTH["holdout_identities"])
    replace = (data_dir / MANIFEST_NAME).is_file()
    if replace:
        found = Manifest.load(data_dir)
        same = found.source == want and found.image_size == SYNTH["image_size"]
        if same and (data_dir / VERIFY_NAME).is_file():
            print(f"[demo] reusing synthetic identities in {data_dir}")
            return
        if not found.source.startswith("synth("):  # converted data: not ours to replace
            raise InputError(f"holds '{found.source}', not the demo's synthetic identities",
                             where=data_dir / MANIFEST_NAME,
                             fix=f"move {data_dir} away (or delete it: `make clean` does), then rerun "
                                 "the demo")
        print(f"[demo] {data_dir} holds {found.source} at {found.image_size} px, not the demo's {want} at "
              f"{SYNTH['image_size']} px; synthesizing the demo's set in its place")

    t0 = time.perf_counter()
    m = synthesize(data_dir, **SYNTH, overwrite=replace)
    print(
        f"[demo] synthesized {m.num_samples} images of {m.num_classes} identities "
        f"(+{SYNTH['holdout_identities']} held out) in {time.perf_counter() - t0:.0f} s"
    )


def split_batch(ranks: int, config: str, settings: list[str]) -> list[str]:
    """The override that rounds the config's global batch down to equal shares for `ranks` (e.g. 128 at
    `make demo RANKS=3`); none where it already splits, as at the default 2 ranks."""
    from facescale.config.load import load_config

    cfg = load_config(config, settings)
    sch = cfg.schedule
    f2c = cfg.head.type == "f2c"  # F2C splits each rank's batch in two halves (check_f2c_config)
    unit = ranks * sch.grad_accumulation * (2 if f2c else 1)
    if sch.global_batch_size % unit == 0:
        return []
    batch = max(unit, sch.global_batch_size // unit * unit)
    print(f"[demo] schedule.global_batch_size {sch.global_batch_size} is not a multiple of {unit} ({ranks} "
          f"ranks x {sch.grad_accumulation} accumulation steps{' x 2 F2C halves' if f2c else ''}); "
          f"training with {batch}")
    return [f"schedule.global_batch_size={batch}"]


def train(ranks: int, config: str, run_dir: Path, overrides: list[str]) -> dict:
    """One torchrun job of `ranks` CPU processes; returns its result.json. A failed job ends the demo with
    its exit code: the ranks and torchrun have said why."""
    settings = [f"logging.run_dir={run_dir}", "checkpoint.resume=none", *overrides]
    settings += split_batch(ranks, config, settings)
    cmd = local_train_command(ranks, config, settings)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    print("[demo] " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise SystemExit(code if code > 0 else 128 - code)  # killed by signal N: 128 + N, as a shell says
    return json.loads((run_dir / "result.json").read_text())


def _pfc_line(pfc_dir: Path, steps: int) -> str:
    """The held-out accuracy of an earlier `make demo` (Partial FC) run, to read beside the F2C run."""
    path = pfc_dir / "result.json"
    if not path.is_file():
        return f"no run in {pfc_dir} yet (`make demo` trains it on the same data)"
    pfc = json.loads(path.read_text())
    ver = pfc["eval"].get("verify", {})
    return f"{100 * ver.get('accuracy', float('nan')):.2f}% after {pfc['steps']} steps (this run: {steps})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=bounded_int(1), default=2)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--mode", choices=["pfc", "f2c"], default="pfc")
    p.add_argument("--config", default=None, help=f"default: {PFC_CONFIG} (pfc), {F2C_CONFIG} (f2c)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = p.parse_args(argv)

    ensure_data(DATA)
    pfc_dir = Path(args.out) / f"pfc_r{args.sample_rate:g}"
    if args.mode == "f2c":
        run_dir, config, overrides = Path(args.out) / "f2c", args.config or F2C_CONFIG, list(args.set)
    else:
        config = args.config or PFC_CONFIG
        run_dir, overrides = pfc_dir, [f"head.sample_rate={args.sample_rate}", *args.set]
    t0 = time.perf_counter()
    result = train(args.ranks, config, run_dir, overrides)
    wall = time.perf_counter() - t0
    ver = result["eval"].get("verify", {})
    acc, base = ver.get("accuracy", float("nan")), ver.get("pixel_accuracy", float("nan"))
    print("\n================ facescale demo ================")
    print(f"ranks                 : {args.ranks} (CPU, gloo, DeepSpeed)")
    if args.mode == "f2c":
        print(f"head                  : F2C dynamic class pool ({config})")
    else:
        print(f"sample rate           : {args.sample_rate}")
    print(f"steps                 : {result['steps']}  final loss {result['final_loss']:.3f}")
    print(f"held-out accuracy     : {100 * acc:.2f}%  (10-fold, {ver.get('num_pairs', '?')} pairs)")
    print(f"raw-pixel baseline    : {100 * base:.2f}%  (same pairs)")
    print(f"gain over pixels      : {100 * (acc - base):+.2f} points")
    if args.mode == "f2c":
        print(f"Partial FC, same data : {_pfc_line(pfc_dir, result['steps'])}")
    print(f"throughput            : {result['samples_per_s']:.0f} images/s  (wall {wall:.0f} s)")
    print(f"TensorBoard           : .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}")
    print_comparison(Path(args.out))
    return 0


def print_comparison(out: Path) -> None:
    """Every finished demo run side by side (e.g. after `make demo` and `make demo SAMPLE_RATE=1.0`)."""
    rows = []
    for result_file in sorted(out.glob("*/result.json")):
        r = json.loads(result_file.read_text())
        ver = r["eval"].get("verify", {})
        rows.append((result_file.parent.name, r["steps"], ver.get("accuracy", float("nan")),
                     ver.get("pixel_accuracy", float("nan")), r["samples_per_s"]))
    if len(rows) < 2:
        return
    print("\nruns so far (same data, same step budget):")
    print(f"  {'run':<14}{'steps':>7}{'accuracy':>10}{'pixels':>9}{'img/s':>8}")
    for name, steps, acc, base, ips in rows:
        print(f"  {name:<14}{steps:>7}{100 * acc:>9.2f}%{100 * base:>8.2f}%{ips:>8.0f}")


if __name__ == "__main__":
    sys.exit(report_errors("facescale demo", main))
