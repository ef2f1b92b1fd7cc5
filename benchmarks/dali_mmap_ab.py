"""DALI's webdataset reader with and without mmap: facescale's CPU training reader, rounds interleaved.

Why `dont_use_mmap=True` in facescale/data/dali_reader.py costs little: full epochs of the reader (decode,
mirror, normalise) on a page-cached local set, each variant built by the real loader, with the decode floor.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import input as bench  # noqa: E402 - benchmarks/input.py: shard writer, timing rounds, decode floor

import facescale.data.dali_reader as dali_reader  # noqa: E402


def _with_mmap_choice(choice: dict) -> None:
    """Make every pipeline built from now on take `dont_use_mmap=choice["off"]`."""
    original = dali_reader.fn.readers.webdataset

    def reader(*args, **kwargs):
        kwargs["dont_use_mmap"] = choice["off"]
        return original(*args, **kwargs)

    dali_reader.fn.readers.webdataset = reader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/dali_mmap_ab.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    choice = {"off": True}
    _with_mmap_choice(choice)
    with tempfile.TemporaryDirectory(prefix="facescale-mmap-") as scratch, \
            multiprocessing.get_context("spawn").Pool(2) as pool:
        directory = Path(scratch)
        manifest = bench.write_shards(directory, 320, 20)
        full = (manifest.num_samples // 128) * 128
        jpegs = []
        for tar in manifest.shard_paths():
            with tarfile.open(tar) as archive:
                jpegs += [archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")]
        cases = {}
        for threads in (1, 2):
            for off in (False, True):
                run = bench.loader_epochs(directory, "dali", threads=threads, workers=0, batch=128, epochs=1)

                def timed(run=run, off=off) -> None:
                    choice["off"] = off
                    run()
                cases[f"DALI CPU reader, {threads} thread(s), dont_use_mmap={off}"] = (timed, full)
            cases[f"decode floor (simplejpeg), {threads} process(es)"] = (
                bench.decode_floor(jpegs, threads, pool), threads * len(jpegs))
        results = bench.measure(cases, args.rounds)
    lines = ["# DALI webdataset reader: mmap or plain reads", "", "```bash",
             "PYTHONPATH=. .venv/bin/python benchmarks/dali_mmap_ab.py " + " ".join(sys.argv[1:]), "```", "",
             f"{manifest.num_samples} samples of 112x112 JPEG, batch 128, page-cached local files; "
             f"{args.rounds} rounds interleaved; img/s.", "",
             "| case | min | median | max |", "|---|---:|---:|---:|"]
    for name, case in results.items():
        lines.append(f"| {name} | {case['img_s_min']:.0f} | **{case['img_s_median']:.0f}** | "
                     f"{case['img_s_max']:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
