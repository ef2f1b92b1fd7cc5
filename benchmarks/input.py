"""Input-pipeline throughput on 112x112 JPEGs: decode + random mirror + normalise to CHW float, images/s.

Measures, on shards written by facescale's ShardWriter from synthetic faces:
  - the decode floor: simplejpeg in a loop, in 1 process and in 2 processes at once (the 2-core floor);
  - facescale's DALI CPU reader with 1 and 2 threads;
  - facescale's webdataset reader (the fallback) with simplejpeg and with PIL, 1 and 2 DataLoader workers;
  - the plain webdataset + PIL path as a user writes it from the library's documentation
    (`WebDataset(urls).shuffle().decode("pil").to_tuple(...).map(transform)` in a DataLoader), 1, 2 workers.
Cases run interleaved, one epoch-set per case per round, so machine noise spreads over all of them; the
medians are compared. Records the load average, and quotes the trainer's data-wait vs step time from a run's
metrics.jsonl. Writes OUT.json and OUT.md.

    PYTHONPATH=. .venv/bin/python benchmarks/input.py --out benchmarks/results/input_cpu
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
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


def measure(cases: dict[str, tuple[Callable[[], None], int]], rounds: int) -> dict[str, dict]:
    """Run every case once untimed, then `rounds` rounds of every case in turn; img/s min/median/max."""
    for run, _ in cases.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in cases}
    loads: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (run, images) in cases.items():
            loads[name].append(os.getloadavg()[0])
            start = time.perf_counter()
            run()
            rates[name].append(images / (time.perf_counter() - start))
    return {name: {"img_s_min": min(r), "img_s_median": statistics.median(r), "img_s_max": max(r),
                   "img_s_all": r, "load_min": min(loads[name]), "load_max": max(loads[name])}
            for name, r in rates.items()}


def decode_all(jpegs: list[bytes]) -> None:
    """simplejpeg decode of every image, one thread (the decode floor's loop)."""
    import simplejpeg

    for data in jpegs:
        simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_into_buffer(jpegs: list[bytes]):
    """simplejpeg decode of every image into one reused array (no allocation; for comparison only)."""
    import simplejpeg

    out = np.empty((112, 112, 3), np.uint8)

    def run() -> None:
        for data in jpegs:
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    return run


def decode_floor(jpegs: list[bytes], processes: int, pool):
    """The floor on `processes` cores: that many processes each decode every image, all at once."""
    if processes == 1:
        return lambda: decode_all(jpegs)

    def run() -> None:
        for result in [pool.apply_async(decode_all, (jpegs,)) for _ in range(processes)]:
            result.get()
    return run


def _library_sample(sample: tuple) -> tuple[torch.Tensor, int]:
    """The documented per-sample transform: PIL image -> random mirror -> CHW float in [-1, 1]."""
    image, label = sample
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    if torch.rand(()) < 0.5:
        pixels = pixels.flip(2)
    return pixels.sub_(127.5).div_(127.5), int.from_bytes(label, "little", signed=True)


def library_epochs(directory: Path, *, workers: int, batch: int, epochs: int):
    """The plain webdataset + PIL DataLoader (shards split by worker, shuffle buffer, default collate)."""
    import webdataset as wds

    urls = [str(p) for p in sorted(directory.glob("*.tar"))]
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                              empty_check=False)
               .shuffle(1024).decode("pil").to_tuple("jpg", "lbl").map(_library_sample))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         persistent_workers=True, multiprocessing_context="spawn",
                                         worker_init_fn=_one_thread)
    count = [0]

    def run() -> None:
        for _ in range(epochs):
            for images, _labels in loader:
                assert images.shape[1:] == (3, 112, 112) and images.dtype == torch.float32
                count[0] += images.shape[0]
    return run, count


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def loader_epochs(directory: Path, reader: str, *, threads: int, workers: int, batch: int, epochs: int,
                  decoder: str = "simplejpeg") -> Callable[[], None]:
    """Full epochs of facescale's training reader (normalised CHW float batches on the CPU)."""
    from facescale.data.loader import build_train_loader

    config = DataConfig(shards=str(directory), reader=reader, num_workers=workers, dali_threads=threads,
                        shuffle_buffer=1024, random_mirror=True, jpeg_decoder=decoder)
    loader = build_train_loader(config, rank=0, world_size=1, batch_size=batch, seed=0,
                                device=torch.device("cpu"))

    def run() -> None:
        for _ in range(epochs):
            for images, _labels in loader.iter_epoch():
                assert images.shape == (batch, 3, 112, 112) and images.dtype == torch.float32
    return run


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


FLOOR, DALI, FALLBACK, FALLBACK_PIL, LIBRARY_PIL = (
    "decode floor (simplejpeg), {n} process(es)", "facescale DALI CPU reader, {n} thread(s)",
    "facescale webdataset reader + simplejpeg, {n} worker(s)",
    "facescale webdataset reader + PIL, {n} worker(s)",
    "plain webdataset + PIL DataLoader, {n} worker(s)")
INTO_BUFFER = "(for comparison) simplejpeg into one reused buffer, 1 process"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=320)
    parser.add_argument("--per-identity", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metrics", default="runs/demo/pfc_r0.1/metrics.jsonl")
    parser.add_argument("--out", default="benchmarks/results/input_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict = {"command": "PYTHONPATH=. .venv/bin/python benchmarks/input.py " + " ".join(sys.argv[1:]),
                     "cpus": os.cpu_count(), "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="facescale-input-") as scratch, \
            multiprocessing.get_context("spawn").Pool(2) as pool:
        directory = Path(scratch)
        manifest = write_shards(directory, args.identities, args.per_identity)
        jpegs = []
        for tar in manifest.shard_paths():
            with tarfile.open(tar) as archive:
                jpegs += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
        results["mean_jpeg_bytes"] = float(np.mean([len(j) for j in jpegs]))
        results["samples"] = manifest.num_samples
        full = (manifest.num_samples // args.batch) * args.batch * args.epochs
        cases: dict[str, tuple[Callable[[], None], int]] = {}
        library_counts = {}
        cases[INTO_BUFFER] = (decode_into_buffer(jpegs), len(jpegs))
        for n in (1, 2):
            cases[FLOOR.format(n=n)] = (decode_floor(jpegs, n, pool), n * len(jpegs))
            cases[DALI.format(n=n)] = (loader_epochs(directory, "dali", threads=n, workers=0,
                                                     batch=args.batch, epochs=args.epochs), full)
            for name, decoder in ((FALLBACK, "simplejpeg"), (FALLBACK_PIL, "pil")):
                cases[name.format(n=n)] = (loader_epochs(directory, "webdataset", threads=1, workers=n,
                                                         batch=args.batch, epochs=args.epochs,
                                                         decoder=decoder), full)
            run, library_counts[n] = library_epochs(directory, workers=n, batch=args.batch,
                                                    epochs=args.epochs)
            cases[LIBRARY_PIL.format(n=n)] = (run, manifest.num_samples * args.epochs)
        results["cases"] = measure(cases, args.rounds)
        for n, count in library_counts.items():  # every sample once per epoch, untimed round included
            assert count[0] == (args.rounds + 1) * args.epochs * manifest.num_samples, (n, count)
        for name, case in results["cases"].items():
            print(f"{name:60s} {case['img_s_median']:8.0f} img/s (load {case['load_min']:.1f}-"
                  f"{case['load_max']:.1f})")
    results["trainer"] = trainer_wait(Path(args.metrics))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text(render_markdown(results))
    return 0


def _target(text: str, ratio: float, met: bool, unit: str = "x") -> str:
    return f"| {text} | {ratio:.2f}{unit} | {'yes' if met else 'no'} |"


def render_markdown(results: dict) -> str:
    """The committed result table with the targets of issue 4 evaluated."""
    cases = results["cases"]
    med = {name: case["img_s_median"] for name, case in cases.items()}
    lines = ["# Input pipeline, 112x112 JPEGs (decode + random mirror + normalise to CHW float)", "",
             "```bash", results["command"], "```", "",
             f"{results['cpus']} CPUs (shared), {results['samples']} samples, mean JPEG "
             f"{results['mean_jpeg_bytes']:.0f} B, batch {results['batch']}; cases interleaved round by "
             "round after one untimed round; img/s.", "",
             "| pipeline | img/s min | median | max | load avg during |", "|---|---:|---:|---:|---|"]
    for name, c in cases.items():
        lines.append(f"| {name} | {c['img_s_min']:.0f} | **{c['img_s_median']:.0f}** | "
                     f"{c['img_s_max']:.0f} | {c['load_min']:.1f}-{c['load_max']:.1f} |")
    lines += ["", "## Targets (issue 4), on medians", "", "| target | ratio | met |", "|---|---:|---|"]
    for n in (1, 2):
        floor, dali = med[FLOOR.format(n=n)], med[DALI.format(n=n)]
        library, own_pil = med[LIBRARY_PIL.format(n=n)], med[FALLBACK_PIL.format(n=n)]
        fallback = med[FALLBACK.format(n=n)]
        lines.append(_target(f"DALI CPU ({n} thread(s)) >= 3x the webdataset + PIL path ({n} worker(s))",
                             dali / library, dali >= 3 * library))
        lines.append(_target(f"DALI CPU ({n} thread(s)) >= 0.75x the decode floor on {n} core(s)",
                             dali / floor, dali >= 0.75 * floor))
        lines.append(_target(f"facescale webdataset reader + simplejpeg ({n} worker(s)) within 1.5x of the "
                             f"decode floor on {n} core(s)", floor / fallback, floor <= 1.5 * fallback,
                             "x slower"))
        lines.append(f"| (for comparison) DALI CPU ({n} thread(s)) vs facescale's own webdataset reader with "
                     f"PIL | {dali / own_pil:.2f}x | - |")
    trainer = results.get("trainer")
    lines += ["", "## Is the demo trainer input-bound?", ""]
    if trainer:
        lines.append(f"From `{trainer['run']}` ({trainer['windows']} logging windows): data wait "
                     f"{trainer['data_wait_ms_mean']:.1f} ms mean (max {trainer['data_wait_ms_max']:.1f}) "
                     f"per step against {trainer['step_ms_mean']:.0f} ms per step, i.e. "
                     f"{100 * trainer['wait_fraction']:.1f}% of the step is spent waiting for data.")
    else:
        lines.append("No metrics.jsonl found; run `make demo` and re-run with --metrics.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
