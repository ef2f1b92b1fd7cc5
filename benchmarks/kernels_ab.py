"""The head's CPU kernels of several git revisions, side by side in one process: each revision's
facescale/heads/kernels/ sources are compiled with native.py's flags and loaded together, and the timed
calls alternate between them, so every revision sees the same machine load. For changes to the kernels that
are a few percent of a step, on a machine too noisy for two separate runs to compare.

  step    the head's step (benchmarks/head.py's head; C = 100k, B = --batch, D = 512) with each build in turn
  update  the center update kernel alone on C' scattered rows of a bf16 or fp32 [C, D] shard with momentum
          (and the bf16 residual), caches flushed before each call; also checks the builds agree bit for bit
  catch-up  the deferred dense catch-up alone (heads/deferred_dense.py): C' scattered rows of such a shard
          replay --missed zero-gradient steps each into the forward's gathered copy, caches flushed; also
          checks the builds agree bit for bit
  gather  the forward's row gather alone: C' scattered rows of a [C, D] shard into a buffer, caches flushed;
          also checks the builds agree bit for bit

    PYTHONPATH=. .venv/bin/python benchmarks/kernels_ab.py step --dtype bf16 --mode sparse --rate 0.1 \\
        --revs 4ab20aa e2af0ab
Prints each revision's median and min, and the median over rounds of its time / the first revision's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as facescale's processes run

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import facescale.heads.native as native  # noqa: E402

CLASSES, DIM = 100_000, 512


def build_revision(rev: str, folder: Path, extra_flags: tuple[str, ...] = ()) -> native.CenterKernels:
    """The kernels library of git revision `rev`, compiled into `folder` with native.py's flags, then
    `extra_flags` (a later flag wins: `-mprefer-vector-width=256` undoes native.py's 512)."""
    folder.mkdir(parents=True)
    for source in (*native.SOURCES, *native._HEADERS):
        name = source.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, check=True)
        (folder / source.name).write_bytes(text.stdout)
    target = folder / "kernels.so"
    sources = sorted(str(path) for path in folder.glob("*.cpp"))
    command = native.compile_command(native.compiler(), *extra_flags, "-shared", *sources, "-o", str(target))
    subprocess.run(command, check=True)
    return native.CenterKernels(ctypes.CDLL(str(target)), target)


def alternate(calls: list[Callable[[int], float]], rounds: int) -> list[list[float]]:
    """ms of calls[k](round) for every round, the calls of a round one after the other, in reverse order every
    other round (so that no build always runs right after the same one)."""
    times: list[list[float]] = [[] for _ in calls]
    for i in range(rounds):
        order = range(len(calls)) if i % 2 == 0 else reversed(range(len(calls)))
        for k in order:
            times[k].append(calls[k](i))
    return times


Calls = list[Callable[[int], float]]


def step_calls(libs: list[native.CenterKernels], args: argparse.Namespace) -> tuple[Calls, None]:
    """One head; call k runs a step on build k (every module's `center_kernels` answers the chosen build)."""
    import head as bench

    chosen = [libs[0]]
    for module in list(sys.modules.values()):
        if getattr(module, "center_kernels", None) is native.center_kernels:
            module.center_kernels = lambda: chosen[0]
    cfg = {"dtype": args.dtype, "mode": args.mode, "rate": args.rate, "gemm": "auto", "device": "cpu"}
    head = bench.build_head(cfg, CLASSES, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(args.batch, DIM, generator=gen).to(bench.gemm_dtype(cfg)) for _ in range(4)]
    labels = [torch.randint(0, CLASSES, (args.batch,), generator=gen) for _ in range(4)]
    counter = [0]

    deferred = head.center_optimizer.deferred

    def run(lib: native.CenterKernels) -> float:
        chosen[0], i = lib, counter[0]
        counter[0] += 1
        if deferred is not None and deferred._rows is not None:
            # the forward's catch-up runs the kernels the last optimizer step bound: this step's build instead
            deferred._rows = (lib, *deferred._rows[1:])
        x = inputs[i % 4].clone().requires_grad_()
        started = time.perf_counter()
        loss, _ = head(x, labels[i % 4], i)
        loss.backward()
        head.optimizer_step(0.1)
        return (time.perf_counter() - started) * 1e3

    for i in range(args.warmup):
        run(libs[i % len(libs)])
    return [lambda _, lib=lib: run(lib) for lib in libs], None


def cache_flusher() -> Callable[[], None]:
    """A call that streams two 64 MB arrays through the caches (past the L3): the next call starts cold."""
    a, b = torch.zeros(16 * 1024 * 1024), torch.ones(16 * 1024 * 1024)

    def flush() -> None:
        a.add_(b, alpha=1e-6)

    return flush


def row_samples(gen: torch.Generator, width: int) -> list[torch.Tensor]:
    """8 sorted samples of `width` distinct local rows, the rounds cycling through them."""
    return [torch.randperm(CLASSES, generator=gen)[:width].sort().values for _ in range(8)]


def builds_agree(outputs: list[tuple]) -> bool:
    """Whether every build's tensors (None: absent) equal the first build's, bit for bit."""
    return all(
        all(a is None or torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))
        for other in outputs[1:]
    )


def update_calls(
    libs: list[native.CenterKernels], args: argparse.Namespace
) -> tuple[Calls, Callable[[], bool]]:
    """Each build updates its own copy of the same shard with the same gradient rows; the check says whether
    the copies are still equal bit for bit."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(CLASSES, generator=gen)[: int(args.rate * CLASSES)].sort().values
    grad = (torch.randn(len(rows), DIM, generator=gen) * 1e-3).to(dtype)
    proj = torch.rand(len(rows), generator=gen) + 0.5
    shard = (torch.randn(CLASSES, DIM, generator=gen) * 0.05).to(dtype)
    momentum = (torch.randn(CLASSES, DIM, generator=gen) * 1e-3).to(dtype)
    residual = (torch.randn(CLASSES, DIM, generator=gen) * 1e-5).to(dtype) if args.dtype == "bf16" else None
    flush_caches = cache_flusher()
    low = [None if residual is None else residual.clone() for _ in libs]
    states = [(shard.clone(), momentum.clone(), low[k], torch.zeros(CLASSES)) for k in range(len(libs))]

    def run(lib: native.CenterKernels, state: tuple) -> float:
        centers, moment, low, inv_norms = state
        flush_caches()
        started = time.perf_counter()
        lib.sgd(centers, grad, rows, proj_inv=proj, residual=low, momentum=moment, inv_norms=inv_norms,
                lr=0.1, mu=0.9, wd=5e-4, eps=1e-12)  # fmt: skip
        return (time.perf_counter() - started) * 1e3

    calls = [lambda _, lib=lib, state=state: run(lib, state) for lib, state in zip(libs, states, strict=True)]
    return calls, lambda: builds_agree(states)


def catch_up_calls(
    libs: list[native.CenterKernels], args: argparse.Namespace
) -> tuple[Calls, Callable[[], bool]]:
    """Each build brings a fresh copy of the same rows forward by `--missed` steps every round (a new sample
    of rows per round, the same for every build); the check compares the builds' last results bit for bit."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shard = (torch.randn(CLASSES, DIM, generator=gen) * 0.05).to(dtype)
    momentum = (torch.randn(CLASSES, DIM, generator=gen) * 1e-3).to(dtype)
    residual = (torch.randn(CLASSES, DIM, generator=gen) * 1e-5).to(dtype) if args.dtype == "bf16" else None
    lr_history = torch.rand(1024, generator=gen) * 0.1
    flush_caches = cache_flusher()
    width = int(args.rate * CLASSES)
    samples = row_samples(gen, width)
    copies = [(shard.clone(), momentum.clone(), None if residual is None else residual.clone()) for _ in libs]
    results: list[tuple] = [() for _ in libs]

    def run(k: int, round_: int) -> float:
        rows = samples[round_ % len(samples)]
        centers, moment, low = copies[k]
        for copy, original in zip(copies[k], (shard, momentum, residual), strict=True):
            if copy is not None:  # the rows as they were before any round replayed them
                copy.index_copy_(0, rows, original.index_select(0, rows))
        steps_seen = torch.full((CLASSES,), 1000 - args.missed, dtype=torch.int64)
        out, inv_norms = torch.empty(width, DIM, dtype=dtype), torch.empty(CLASSES)
        flush_caches()
        started = time.perf_counter()
        libs[k].catch_up(centers, rows, steps_seen, 1000, lr_history, residual=low, momentum=moment,
                         inv_norms=inv_norms, mu=0.9, wd=5e-4, eps=1e-12, out=out)  # fmt: skip
        elapsed = (time.perf_counter() - started) * 1e3
        results[k] = (centers[rows], moment[rows], None if low is None else low[rows], out, inv_norms[rows])
        return elapsed

    return [lambda round_, k=k: run(k, round_) for k in range(len(libs))], lambda: builds_agree(results)


def gather_calls(
    libs: list[native.CenterKernels], args: argparse.Namespace
) -> tuple[Calls, Callable[[], bool]]:
    """Each build gathers the same C' scattered rows of a [C, D] shard on huge pages (as the head's) into its
    own buffer, a new sample of rows per round, caches flushed; the check compares the builds' last copies."""
    from facescale.heads.huge_pages import empty_rows

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shard = empty_rows((CLASSES, DIM), dtype).copy_(torch.randn(CLASSES, DIM, generator=gen))
    width = int(args.rate * CLASSES)
    samples = row_samples(gen, width)
    flush_caches = cache_flusher()
    outs = [torch.empty(width, DIM, dtype=dtype) for _ in libs]

    def run(k: int, round_: int) -> float:
        flush_caches()
        started = time.perf_counter()
        libs[k].gather_rows(shard, samples[round_ % len(samples)], outs[k])
        return (time.perf_counter() - started) * 1e3

    return [lambda round_, k=k: run(k, round_) for k in range(len(libs))], lambda: builds_agree(
        [(out,) for out in outs]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["step", "update", "catch-up", "gather"])
    parser.add_argument("--revs", nargs="+", required=True, help="git revisions; ratios are to the first")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--mode", choices=["dense", "sparse"], default="sparse")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128, help="step: the global batch B")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--missed", type=int, default=10, help="catch-up: steps each row missed (~1/rate)")
    parser.add_argument("--rev-flags", action="append", default=[], metavar="K=FLAGS",
                        help="compiler flags for the K-th revision (0-based), added after native.py's, e.g. "
                        "0=-mprefer-vector-width=256 (repeatable)")
    args = parser.parse_args(argv)
    extra: dict[int, tuple[str, ...]] = {}
    for item in args.rev_flags:
        index, _, flags = item.partition("=")
        extra[int(index)] = tuple(flags.split())
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build_revision(rev, Path(tmp) / f"{k}-{rev}", extra.get(k, ()))
                for k, rev in enumerate(args.revs)]
        make_calls = {
            "step": step_calls,
            "update": update_calls,
            "catch-up": catch_up_calls,
            "gather": gather_calls,
        }[args.what]
        calls, identical = make_calls(libs, args)
        times = alternate(calls, args.rounds)
    label = f"{args.what} {args.dtype}" + (f" {args.mode} B={args.batch}" if args.what == "step" else "")
    label += f" r={args.rate}"
    label += f" missed={args.missed}" if args.what == "catch-up" else ""
    names = [rev + (f" [{' '.join(extra[k])}]" if k in extra else "") for k, rev in enumerate(args.revs)]
    for rev, samples in zip(names, times, strict=True):
        ratio = statistics.median(a / b for a, b in zip(samples, times[0], strict=True))
        print(f"{label} {rev}: median {statistics.median(samples):.2f} ms, min {min(samples):.2f}, "
              f"median of round ratios to {names[0]} {ratio:.3f}")  # fmt: skip
    if identical is not None:
        print(f"builds bit-identical after {args.rounds} rounds: {identical()}")


if __name__ == "__main__":
    main()
