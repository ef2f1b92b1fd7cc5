"""Parts of the head's CPU step measured apart, each against its alternative in the same process, in
alternating rounds (so both see the same machine load); the figures the head's code comments cite.

  rows        the fused update kernel and the row gather on C' of C scattered sorted rows (a new sample each
              round) of a [C, D] shard whose
              memory is advised to huge pages (heads/huge_pages.py) vs plain 4 KB pages; caches are flushed
              before each call (a 64 MB pass), as the step's GEMMs leave them
  sort        the sampled ids in ascending order from the shard's scores: a native radix select (heads/
              sampling.py) vs torch.topk + mark-and-scan; mark-and-scan vs torch.sort of the ids alone
  draw        the whole sampler (heads/sampling.sample_centers, B = 128 labels) from a seed, the native
              kernels drawing torch's stream and selecting in one call, vs from a torch.Generator (uniform_ +
              select)
  cosine GEMM the fp32 forward's cosines [B, D] x [D, C'] into the logits buffer, scaled and clamped, as the
              head runs them (heads/norm_linear.cosine_blocks) vs other block sizes, the earlier form and
              one MKL torch.mm
  logits passes the margin softmax's passes over the [B, C'] buffer and the bf16 cosines' widening, native
              (heads/kernels/logit_passes.cpp) vs the torch ops they replace

    PYTHONPATH=. .venv/bin/python benchmarks/head_parts.py --out benchmarks/results/head_parts_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as facescale's processes run

import torch  # noqa: E402

DIM = 512
PARTS = ("rows", "sort", "draw", "cosine GEMM", "logits passes")


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _alternate(
    cases: dict[str, Callable[[], None]],
    rounds: int,
    before: Callable[[], None],
    each_round: Callable[[], None] = lambda: None,
) -> dict:
    """Median ms per case over `rounds` rounds: `each_round()` opens a round, then the cases run in turn,
    each after `before()`."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        each_round()
        for name, run in cases.items():
            before()
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: _median_ms(t) for name, t in times.items()}


def rows_case(classes: int, sampled: int, dtype: torch.dtype, rounds: int) -> dict:
    """Update kernel (2048-row blocks, fp32 gradient block warm in cache) and gather, huge vs 4 KB pages."""
    from facescale.heads.huge_pages import empty_rows
    from facescale.heads.native import center_kernels

    kernels = center_kernels()
    if kernels is None:
        return {"skipped": "no C++ compiler: the fused kernels are not built"}
    flush = torch.zeros(16 * 1024 * 1024)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(sampled, DIM, generator=gen)
    product = torch.empty(2048, DIM)
    inv = torch.ones(classes)
    proj = torch.ones(sampled)
    gathered = torch.empty(sampled, DIM, dtype=dtype)
    rows = torch.empty(sampled, dtype=torch.int64)

    def draw_rows() -> None:  # a new sample each round, as each step draws its own
        rows.copy_(torch.randperm(classes, generator=gen)[:sampled].sort().values)

    draw_rows()

    def storage(huge: bool) -> dict:
        make = empty_rows if huge else (lambda shape, dt: torch.empty(shape, dtype=dt))
        centers = make((classes, DIM), dtype)
        centers.copy_(torch.randn(classes, DIM, generator=gen))
        state = {"centers": centers, "momentum": make((classes, DIM), dtype).zero_()}
        state["residual"] = make((classes, DIM), dtype).zero_() if dtype == torch.bfloat16 else None
        return state

    def update(s: dict) -> Callable[[], None]:
        def run() -> None:
            for lo in range(0, sampled, 2048):
                hi = min(sampled, lo + 2048)
                product[: hi - lo].copy_(grad[lo:hi])
                kernels.sgd(s["centers"], product[: hi - lo], rows[lo:hi], proj_inv=proj[lo:hi],
                            residual=s["residual"], momentum=s["momentum"], inv_norms=inv, lr=0.1, mu=0.9,
                            wd=5e-4, eps=1e-12)
        return run

    def gather(s: dict) -> Callable[[], None]:
        return lambda: kernels.gather_rows(s["centers"], rows, gathered)

    huge, small = storage(True), storage(False)
    result = _alternate({"update huge": update(huge), "update 4k": update(small), "gather huge": gather(huge),
                         "gather 4k": gather(small)}, rounds, lambda: flush.add_(1.0), draw_rows)
    copy_ms = _alternate({"copy": lambda: [product[: min(sampled, lo + 2048) - lo].copy_(
        grad[lo : min(sampled, lo + 2048)]) for lo in range(0, sampled, 2048)]}, rounds, lambda: None)["copy"]
    return {**result, "gradient block copies (in update)": copy_ms}


def sort_case(classes: int, sampled: int, rounds: int) -> dict:
    """The sampler's choice of C' ids from [0, C) scores, ascending: the native radix select + ordered scan
    (heads/sampling._top_k_sorted) vs torch.topk then mark-and-scan, and mark-and-scan vs torch.sort alone."""
    from facescale.heads.native import center_kernels
    from facescale.heads.sampling import _sorted

    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(classes, generator=gen)
    ids = torch.topk(scores, sampled, sorted=False).indices
    assert torch.equal(_sorted(ids, classes), ids.sort().values)

    def topk_then_scan() -> torch.Tensor:
        return _sorted(torch.topk(scores, sampled, sorted=False).indices, classes)

    cases = {"topk + mark-and-scan": topk_then_scan, "mark-and-scan": lambda: _sorted(ids, classes),
             "torch.sort": lambda: ids.sort()}
    kernels = center_kernels()
    if kernels is not None:
        assert torch.equal(kernels.top_k_sorted(scores, sampled), ids.sort().values)
        cases = {"native select": lambda: kernels.top_k_sorted(scores, sampled), **cases}
    return _alternate(cases, rounds, lambda: None)


def draw_case(classes: int, sampled: int, rounds: int) -> dict:
    """The sampler as the head calls it, from a seed (native draw) vs from a torch.Generator seeded alike."""
    from facescale.heads.sampling import sample_centers, sampling_seed

    labels = torch.randint(0, classes, (128,), generator=torch.Generator().manual_seed(4))
    seeds = iter(range(10**9))

    def from_seed(seed: int) -> torch.Tensor:
        return sample_centers(labels, 0, classes, sampled, sampling_seed(1, 0, seed)).index

    def from_generator(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sampling_seed(1, 0, seed))
        return sample_centers(labels, 0, classes, sampled, generator).index

    assert torch.equal(from_seed(0), from_generator(0))
    return _alternate({"from a seed (native draw)": lambda: from_seed(next(seeds)),
                       "from a generator (uniform_ + select)": lambda: from_generator(next(seeds))},
                      rounds, lambda: None)


def gemm_case(batch: int, sampled: int, rounds: int) -> dict:
    """The fp32 forward's cosines into the logits buffer (GEMM, times 1/||w||, clamp), as the head runs them
    (heads/norm_linear.py; on oneDNN: fresh ~2 MiB products, each scaled and clamped into the buffer) against
    the same in 1024-row blocks and in one product, the earlier form (1024-row blocks copied into the buffer,
    then one pass), and one MKL torch.mm into the buffer, then one pass."""
    from facescale.heads.gemm import fp32_backend, matmul
    from facescale.heads.native import center_kernels
    from facescale.heads.norm_linear import cosine_blocks, cosine_gemm, fresh_cosine_blocks, fused_cosines

    kernels = center_kernels()
    if kernels is None:
        return {"skipped": "no C++ compiler: the native passes are not built"}
    gen = torch.Generator().manual_seed(2)
    x, weight = torch.randn(batch, DIM, generator=gen), torch.randn(sampled, DIM, generator=gen)
    scale, out = torch.rand(sampled, generator=gen) * 0.1, torch.zeros(batch, sampled)

    def head() -> None:  # as _NormLinear.forward makes the cosines into its buffer
        if fused_cosines(x, weight, scale, out) is None:
            kernels.scale_clamp_(cosine_gemm(x, weight, out), scale)

    def fused(rows: int) -> Callable[[], None]:
        def run() -> None:
            for lo in range(0, sampled, rows):
                product = matmul(x, weight[lo : lo + rows].t())
                kernels.scale_clamp_into(product, scale[lo : lo + rows], out[:, lo : lo + rows])

        return run

    fresh = fresh_cosine_blocks(x, weight)
    rows = next(cosine_blocks(x, weight))[1] if fresh else 1024
    cases = {f"head ({fp32_backend()}, {rows}-row blocks)": head}
    if fresh:
        cases |= {"1024-row blocks": fused(1024), "one product": fused(sampled),
                  "1024-row blocks copied, then a pass": lambda: kernels.scale_clamp_(
                      cosine_gemm(x, weight, out), scale)}
    cases["one MKL torch.mm, then a pass"] = lambda: kernels.scale_clamp_(
        torch.mm(x, weight.t(), out=out), scale)
    return _alternate(cases, rounds, lambda: None)


def softmax_case(batch: int, sampled: int, rounds: int) -> dict:
    """The in-place margin softmax's passes over an fp32 [B, C'] logits buffer (heads/dist_cross_entropy.py):
    native scale + row max, then shift + exp + row sum, vs the torch ops they replace; and the bf16 cosines'
    widening + scale + clamp in place (native, all threads) vs torch into a separate fp32 tensor."""
    from facescale.heads.native import center_kernels

    kernels = center_kernels()
    if kernels is None:
        return {"skipped": "no C++ compiler: the native passes are not built"}
    gen = torch.Generator().manual_seed(3)
    cos = (torch.randn(batch, sampled, generator=gen) * 0.1).clamp_(-1, 1)  # as in a head: no exp underflow
    target = torch.randint(0, sampled, (batch,), generator=gen)
    buffer, row_max, sums = torch.empty_like(cos), torch.empty(batch), torch.empty(batch)

    def native() -> None:
        buffer.copy_(cos)
        kernels.scale_row_max_(buffer, 64.0, target, row_max)
        kernels.exp_row_sums_(buffer, row_max, sums)

    def torch_ops() -> None:
        buffer.copy_(cos)
        logits = buffer.mul_(64.0)
        peak = logits.amax(dim=1)
        logits.sub_(peak[:, None]).exp_().sum(dim=1)

    x_hat, weight = torch.randn(batch, DIM, generator=gen).bfloat16(), torch.randn(sampled, DIM).bfloat16()
    scale = torch.rand(sampled, generator=gen)

    def torch_cosines() -> None:
        torch.mul(torch.mm(x_hat, weight.t()), scale, out=buffer).clamp_(-1.0, 1.0)

    def native_cosines() -> None:
        kernels.bf16_cosines_in_place(x_hat, weight, scale, buffer)

    copy_ms = _alternate({"copy": lambda: buffer.copy_(cos)}, rounds, lambda: None)["copy"]
    result = _alternate({"softmax native": native, "softmax torch ops": torch_ops,
                         "bf16 cosines native": native_cosines, "bf16 cosines torch": torch_cosines},
                        rounds, lambda: None)
    return {**result, "buffer copy (in both softmax figures)": copy_ms}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--sampled", type=int, nargs="+", default=[10_000, 30_000])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to measure")
    args = p.parse_args(argv)
    parts = set(args.parts)
    torch.set_num_threads(args.threads)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    result: dict = {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/head_parts.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads, "torch": torch.__version__, "load_start": list(os.getloadavg()),
        "transparent_hugepage": thp.read_text().strip() if thp.exists() else "n/a",
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "cases": [],
    }
    for sampled in args.sampled:
        for dtype in (torch.float32, torch.bfloat16) if "rows" in parts else ():
            result["cases"].append({"part": "rows", "C": args.classes, "C'": sampled, "dtype": str(dtype),
                                    "ms": rows_case(args.classes, sampled, dtype, args.rounds)})
        for part, case in (("sort", sort_case), ("draw", draw_case)):
            if part in parts:
                result["cases"].append({"part": part, "C": args.classes, "C'": sampled,
                                        "ms": case(args.classes, sampled, args.rounds * 4)})
        for batch in args.batch:
            for part, case in (("cosine GEMM", gemm_case), ("logits passes", softmax_case)):
                if part in parts:
                    result["cases"].append({"part": part, "B": batch, "C'": sampled,
                                            "ms": case(batch, sampled, args.rounds)})
    big, big_sampled = 10 * args.classes, 10 * max(args.sampled)  # the sampler at a 10x larger shard
    for part, case in (("sort", sort_case), ("draw", draw_case)):
        if part in parts:
            result["cases"].append({"part": part, "C": big, "C'": big_sampled,
                                    "ms": case(big, big_sampled, args.rounds)})
    result["load_end"] = list(os.getloadavg())
    text = markdown(result)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(text)
    return result


def markdown(result: dict) -> str:
    lines = [
        "# Parts of the head's CPU step, each against its alternative (medians, alternating rounds)", "",
        f"Command: `{result['command']}`  ",
        f"{result['threads']} threads, torch {result['torch']}, transparent_hugepage: "
        f"`{result['transparent_hugepage']}`, OMP_WAIT_POLICY={result['omp_wait_policy']}; load average at "
        f"start / end: {result['load_start'][0]:.1f} / {result['load_end'][0]:.1f}.", "",
        "| part | shape | ms (median) |", "|---|---|---|",
    ]
    for case in result["cases"]:
        shape = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{v}" for k, v in case.items()
                          if k not in ("part", "ms"))
        timings = "; ".join(f"{name} {ms:.2f}" if isinstance(ms, float) else f"{name}: {ms}"
                            for name, ms in case["ms"].items())
        lines.append(f"| {case['part']} | {shape} | {timings} |")
    lines += [] if not any(case["part"] == "rows" for case in result["cases"]) else [
        "",
        "rows: the update kernel and the gather over C' sorted random rows of the shard (a new sample each "
        "round, the same for both page sizes), after a 64 MB pass "
        "that evicts the caches; `update` includes copying each 2048-row gradient block into the reused "
        "product buffer (as the step's GEMM writes it), timed alone in the last column.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
