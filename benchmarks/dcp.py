"""Benchmark of the F2C head (Dynamic Class Pool) against the Partial FC head as the identity count C grows.

One CPU process (world size 1), synthetic normalised features, no images: the DCP step is the two-pass
insertion + loss + backward of `DcpHead` (labels drawn from [0, C)); the Partial FC step is forward, backward
and the center optimizer step of `PartialFCHead`. Every configuration runs in a fresh subprocess so its peak
RSS is its own. The identity index (CSR over C identities) is the only C-sized structure of the DCP mode;
its bytes are reported beside the head's. A second table times the backbone work per iteration with and
without G-Net (the "demo" backbone, 112 px), which is the extra cost of F2C outside the head.

    .venv/bin/python benchmarks/dcp.py --classes 100k 1M 10M --out benchmarks/results/dcp_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DIM, GIB = 512, 1024**3


def parse_count(text: str) -> int:
    """'100k' -> 100000, '10M' -> 10000000."""
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def _timed(step, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def make_dcp_step(classes: int, queue: int, batch: int, ids: int):
    """One DCP iteration's head work as a closure, and its row; labels are ids (shared by x and y) +
    instance halves, drawn from [0, C)."""
    from facescale.config.schema import MarginConfig
    from facescale.f2c.ema import GalleryNet
    from facescale.f2c.head import DcpHead
    from facescale.heads.margins import build_margin

    head = DcpHead(
        GalleryNet(torch.nn.Identity(), 0.99),
        DIM,
        build_margin(MarginConfig(type="cosface", m3=0.4)),
        queue_size=queue,
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    rows = ids + batch // 2

    def step() -> None:
        identity = torch.randint(0, classes, (ids,), generator=g)
        lx = torch.cat([identity, torch.randint(0, classes, (batch // 2,), generator=g)])
        ly = torch.cat([identity, torch.randint(0, classes, (batch // 2,), generator=g)])
        px, py = (torch.randn(rows, DIM, generator=g).requires_grad_() for _ in range(2))
        gx, gy = (F.normalize(torch.randn(rows, DIM, generator=g), dim=1) for _ in range(2))
        loss, _ = head(px, py, lx, ly, gx, gy)
        loss.backward()

    images_per_identity = 20  # for the identity-index size: CSR starts + per-image shard/offset/size
    return step, {
        "head": "dcp",
        "classes": classes,
        "queue_size": queue,
        "probes_per_pass": rows,
        "state_gib": (head.pool.features.numel() * 4 + head.pool.num_slots * 24) / GIB,
        "identity_index_gib": ((classes + 1) * 8 + classes * images_per_identity * 20) / GIB,
    }


def run_dcp_interleaved(classes: list[int], queue: int, batch: int, ids: int, repeats: int) -> list[dict]:
    """Time the DCP head at every C in one process, round-robin step by step, so that a shared machine's
    load changes hit every C alike (the head holds nothing C-sized, so C only changes the label draw)."""
    made = [make_dcp_step(c, queue, batch, ids) for c in classes]
    times: list[list[float]] = [[] for _ in classes]
    for round_number in range(repeats + 3):
        for i, (step, _) in enumerate(made):
            t0 = time.perf_counter()
            step()
            if round_number >= 3:
                times[i].append(time.perf_counter() - t0)
    return [dict(row, step_ms=1e3 * statistics.median(t)) for (_, row), t in zip(made, times, strict=True)]


def run_pfc(classes: int, batch: int, sample_rate: float, repeats: int) -> dict:
    """Time one Partial FC step (forward, backward, SGD-momentum center update) at `sample_rate`."""
    from facescale.config.schema import MarginConfig
    from facescale.heads.margins import build_margin
    from facescale.heads.partial_fc import PartialFCHead

    head = PartialFCHead(classes, DIM, build_margin(MarginConfig()), seed=0, sample_rate=sample_rate)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        emb = torch.randn(batch, DIM, generator=g).requires_grad_()
        loss, _ = head(emb, torch.randint(0, classes, (batch,), generator=g), 0)
        loss.backward()
        head.optimizer_step(0.1)

    times = _timed(step, 2, repeats)
    return {
        "head": "partial_fc",
        "classes": classes,
        "sample_rate": sample_rate,
        "probes_per_pass": batch,
        "step_ms": 1e3 * statistics.median(times),
        "state_gib": 2 * classes * DIM * 4 / GIB,
    }


def run_backbone(batch: int, ids: int, repeats: int) -> dict:
    """Backbone time per iteration: P-Net fwd+bwd on x and y, and G-Net forward on both (demo net)."""
    from facescale.config.schema import ModelConfig
    from facescale.f2c.ema import GalleryNet
    from facescale.models.registry import build_backbone

    pnet = build_backbone(ModelConfig(name="demo", embedding_size=128))
    gnet = GalleryNet(pnet, 0.99)
    rows = ids + batch // 2
    x, y = torch.randn(rows, 3, 112, 112), torch.randn(rows, 3, 112, 112)

    def probe() -> None:
        (pnet(x).sum() + pnet(y).sum()).backward()

    def gallery() -> None:
        gnet.update(pnet)
        gnet(y), gnet(x)

    p, q = statistics.median(_timed(probe, 1, repeats)), statistics.median(_timed(gallery, 1, repeats))
    return {
        "images_per_pass": rows,
        "pnet_fwd_bwd_ms": 1e3 * p,
        "gnet_ema_fwd_ms": 1e3 * q,
        "gnet_extra_fraction": q / p,
    }


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    kind, classes = args.child.split(":")
    if kind == "dcp":
        rows = run_dcp_interleaved(
            [int(c) for c in classes.split(",")], args.queue, args.batch, args.ids, args.repeats
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        print(json.dumps([dict(row, peak_rss_gib_all_c=peak) for row in rows]))
        return
    if kind == "pfc":
        out = run_pfc(int(classes), args.batch, args.sample_rate, args.repeats)
    else:
        out = run_backbone(args.batch, args.ids, args.repeats)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", nargs="+", default=["100k", "1M", "10M"])
    p.add_argument("--queue", type=int, default=16384, help="DCP pool slots Q (fixed as C grows)")
    p.add_argument("--batch", type=int, default=128, help="instance images per rank (B)")
    p.add_argument("--ids", type=int, default=128, help="identities per rank (B_id)")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--pfc-max-gib", type=float, default=6.0, help="skip Partial FC above this state size")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    passthrough = [
        f"--queue={args.queue}",
        f"--batch={args.batch}",
        f"--ids={args.ids}",
        f"--sample-rate={args.sample_rate}",
        f"--repeats={args.repeats}",
        f"--threads={args.threads}",
    ]
    rows, skipped = [], []
    dcp_job = "dcp:" + ",".join(str(parse_count(c)) for c in args.classes)
    jobs = [dcp_job] + [f"pfc:{parse_count(c)}" for c in args.classes]
    for job in [*jobs, "backbone:0"]:
        classes = int(job.split(":")[1].split(",")[-1])
        if job.startswith("pfc") and 2 * classes * DIM * 4 / GIB > args.pfc_max_gib:
            skipped.append(
                f"partial_fc at C={classes}: centers + momentum need "
                f"{2 * classes * DIM * 4 / GIB:.1f} GiB (> --pfc-max-gib {args.pfc_max_gib})"
            )
            continue
        done = subprocess.run(
            [sys.executable, __file__, f"--child={job}", *passthrough],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows += result if isinstance(result, list) else [result]
        print(result, flush=True)
    report = {
        "command": ".venv/bin/python " + " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rows": rows,
        "skipped": skipped,
    }
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The results as the committed Markdown table, the command on top."""
    lines = [
        f"`{report['command']}`",
        "",
        f"CPU, {report['threads']} thread(s), torch {report['torch']}.",
        "",
        "| head | C | pool Q / sample rate | probes per pass | step ms | head state GiB | "
        "identity index GiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r.get("head") == "dcp":
            lines.append(
                f"| dcp | {r['classes']:,} | Q={r['queue_size']} | {r['probes_per_pass']} | "
                f"{r['step_ms']:.0f} | {r['state_gib']:.3f} | {r['identity_index_gib']:.3f} | "
                f"{r['peak_rss_gib_all_c']:.2f} (all C, one process) |"
            )
        elif r.get("head") == "partial_fc":
            lines.append(
                f"| partial_fc | {r['classes']:,} | r={r['sample_rate']} | {r['probes_per_pass']} | "
                f"{r['step_ms']:.0f} | {r['state_gib']:.3f} | - | {r['peak_rss_gib']:.2f} |"
            )
    lines += [f"| partial_fc | skipped | {s} |" for s in report["skipped"]]
    dcp = [r["step_ms"] for r in report["rows"] if r.get("head") == "dcp"]
    if dcp:
        spread = (max(dcp) - min(dcp)) / statistics.median(dcp)
        lines += [
            "",
            f"DCP step time spread over C: {100 * spread:.1f}% of the median (target: within ±10%).",
        ]
    for r in report["rows"]:
        if "gnet_extra_fraction" in r:
            lines += [
                "",
                f"Backbone per iteration ({r['images_per_pass']} images per pass, demo net): P-Net fwd+bwd "
                f"on x and y {r['pnet_fwd_bwd_ms']:.0f} ms; G-Net EMA + forward on both "
                f"{r['gnet_ema_fwd_ms']:.0f} ms = +{100 * r['gnet_extra_fraction']:.0f}% backbone time.",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
