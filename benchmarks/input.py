"""Input-pipeline throughput on 112x112 JPEGs: decode + random mirror + normalise to CHW float, images/s.

Measures the DALI CPU pipeline (1 and 2 threads), the webdataset reader with PIL and with simplejpeg
decoding (1 and 2 DataLoader workers), and a decode floor (simplejpeg in a loop, one thread), on shards
written by facescale's ShardWriter from synthetic faces. Records the load average around every
measurement (shared machines are noisy), and quotes the trainer's data-wait vs step time from a run's
metrics.jsonl. Writes OUT.json and OUT.md.

    PYTHONPATH=. .venv/bin/python benchmarks/input.py --out benchmarks/results/input_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facescale.config.schema import DataConfig
from facescale.data.jpeg import encode_jpeg
from facescale.data.manifest import Manifest
from facescale.data.shard_writer import ShardWriter
from facescale.data.synth_faces import render_identity


def write_shards(out: Path, identities: int, per_identity: int) -> Manifest:
    """Synthetic 112px faces (JPEG q95) in 4 shards, label = identity, in shuffled order."""
    jpegs = [(encode_jpeg(image, 95), label) for label in range(identities)
             for image in render_identity(0, label, per_identity, 112)]
    order = np.random.default_rng(0).permutation(len(jpegs))
    with ShardWriter(out, shard_size=-(-len(jpegs) // 4)) as writer:
        for index in order.tolist():
            writer.write(*jpegs[index])
    manifest = Manifest(num_classes=identities, num_samples=len(jpegs), image_size=112, source="benchmark",
                        shards=writer.shards, samples_per_identity=[per_identity] * identities)
    manifest.save(out)
    return manifest


def timed(run, images: int, rounds: int) -> dict:
    """Run `run()` once untimed, then `rounds` times; img/s min/median/max and the load average."""
    run()
    load_before = os.getloadavg()[0]
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        rates.append(images / (time.perf_counter() - start))
    return {"img_s_min": min(rates), "img_s_median": statistics.median(rates), "img_s_max": max(rates),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def decode_floor(jpegs: list[bytes]):
    """simplejpeg decode of every image, one thread."""
    import simplejpeg

    def run() -> None:
        for data in jpegs:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
    return run


def _pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def loader_epochs(directory: Path, reader: str, *, threads: int, workers: int, batch: int, epochs: int,
                  decoder: str = "simplejpeg"):
    """Full epochs of facescale's training reader (normalised CHW float batches on the CPU)."""
    import facescale.data.wds_reader as wds_reader
    from facescale.data.loader import build_train_loader

    if decoder == "pil":  # DataLoader workers fork after this, so they decode with PIL too
        wds_reader.decode_jpeg = _pil_decode
    config = DataConfig(shards=str(directory), reader=reader, num_workers=workers, dali_threads=threads,
                        shuffle_buffer=1024, random_mirror=True)
    loader = build_train_loader(dataclasses.replace(config), rank=0, world_size=1, batch_size=batch, seed=0,
                                device=torch.device("cpu"))

    def run() -> None:
        for _ in range(epochs):
            for images, _labels in loader.iter_epoch():
                assert images.shape == (batch, 3, 112, 112) and images.dtype == torch.float32
    return run, loader


def trainer_wait(metrics: Path) -> dict | None:
    """Mean data-wait and step ms over the logged windows of a training run (first window excluded)."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"perf/step_ms"' in line]
    rows = rows[1:] or rows
    wait = [r["perf/data_wait_ms"] for r in rows]
    step = [r["perf/step_ms"] for r in rows]
    return {"run": str(metrics), "windows": len(rows), "data_wait_ms_mean": statistics.mean(wait),
            "data_wait_ms_max": max(wait), "step_ms_mean": statistics.mean(step),
            "wait_fraction": statistics.mean(wait) / statistics.mean(step)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--per-identity", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metrics", default="runs/demo/pfc_r0.1/metrics.jsonl")
    parser.add_argument("--out", default="benchmarks/results/input_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/input.py " + " ".join(sys.argv[1:]),
                     "cpus": os.cpu_count(), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="facescale-input-") as scratch:
        directory = Path(scratch)
        manifest = write_shards(directory, args.identities, args.per_identity)
        jpegs = []
        for tar in manifest.shard_paths():
            import tarfile

            with tarfile.open(tar) as archive:
                jpegs += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
        results["mean_jpeg_bytes"] = float(np.mean([len(j) for j in jpegs]))
        per_run = (manifest.num_samples // args.batch) * args.batch * args.epochs
        cases = results["cases"]
        cases["decode floor (simplejpeg, 1 thread)"] = timed(decode_floor(jpegs), len(jpegs), args.rounds)
        for threads in (1, 2):
            run, _ = loader_epochs(directory, "dali", threads=threads, workers=0, batch=args.batch,
                                   epochs=args.epochs)
            cases[f"DALI CPU, {threads} thread(s)"] = timed(run, per_run, args.rounds)
        for decoder in ("simplejpeg", "pil"):  # pil last: it patches the reader module
            for workers in (1, 2):
                run, loader = loader_epochs(directory, "webdataset", threads=1, workers=workers,
                                            batch=args.batch, epochs=args.epochs, decoder=decoder)
                cases[f"webdataset + {decoder}, {workers} worker(s)"] = timed(run, per_run, args.rounds)
                loader.reset()
        for name, case in cases.items():
            print(f"{name:45s} {case['img_s_median']:8.0f} img/s (load {case['load_before']:.1f})")
    results["trainer"] = trainer_wait(Path(args.metrics))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text(render_markdown(results))
    return 0


def render_markdown(results: dict) -> str:
    """The committed result table with the targets of issue 4 evaluated."""
    cases = results["cases"]
    med = {name: case["img_s_median"] for name, case in cases.items()}
    lines = ["# Input pipeline, 112x112 JPEGs (decode + random mirror + normalise to CHW float)", "",
             "```bash", results["command"], "```", "",
             f"{results['cpus']} CPUs (shared), mean JPEG {results['mean_jpeg_bytes']:.0f} B, batch size as "
             "run; img/s over timed rounds after one untimed round.", "",
             "| pipeline | img/s min | median | max | load avg before / after |", "|---|---:|---:|---:|---|"]
    for name, c in cases.items():
        lines.append(f"| {name} | {c['img_s_min']:.0f} | **{c['img_s_median']:.0f}** | "
                     f"{c['img_s_max']:.0f} | "
                     f"{c['load_before']:.1f} / {c['load_after']:.1f} |")
    floor = med["decode floor (simplejpeg, 1 thread)"]
    lines += ["", "## Targets", "", "| target | ratio | met |", "|---|---:|---|"]
    for cores in (1, 2):
        dali, pil = med[f"DALI CPU, {cores} thread(s)"], med[f"webdataset + pil, {cores} worker(s)"]
        lines.append(f"| DALI CPU >= 3x webdataset+PIL at {cores} core(s) | {dali / pil:.2f}x | "
                     f"{'yes' if dali >= 3 * pil else 'no'} |")
        lines.append(f"| DALI CPU ({cores} thread(s)) >= 0.75x decode floor x {cores} | "
                     f"{dali / (floor * cores):.2f}x | {'yes' if dali >= 0.75 * floor * cores else 'no'} |")
        fast = med[f"webdataset + simplejpeg, {cores} worker(s)"]
        lines.append(f"| webdataset+simplejpeg ({cores} worker(s)) within 1.5x of decode floor x {cores} | "
                     f"{floor * cores / fast:.2f}x slower | "
                     f"{'yes' if floor * cores <= 1.5 * fast else 'no'} |")
    trainer = results.get("trainer")
    lines += ["", "## Is the demo trainer input-bound?", ""]
    if trainer:
        lines.append(f"From `{trainer['run']}` ({trainer['windows']} logging windows): data wait "
                     f"{trainer['data_wait_ms_mean']:.1f} ms mean (max {trainer['data_wait_ms_max']:.1f}) "
                     f"per step against {trainer['step_ms_mean']:.0f} ms per step, i.e. "
                     f"{100 * trainer['wait_fraction']:.1f}% "
                     "of the step is spent waiting for data.")
    else:
        lines.append("No metrics.jsonl found; run `make demo` and re-run with --metrics.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
