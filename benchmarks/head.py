"""Benchmark of the Partial FC head on one CPU process (world size 1): step time against the 3-GEMM floor,
peak memory against theory, C x D allocations per step, and the speed-up over the obvious full-FC step.

Every configuration runs in a fresh subprocess (peak RSS is a high-water mark); inside it the head's steps
and the floor GEMMs alternate round by round so their ratio sees the same machine load. The obvious full FC
of each (C, B, dtype) group runs in its own subprocess just before the group (it does not fit beside the
head at C = 1M). See benchmarks/README.md for the columns.

    .venv/bin/python benchmarks/head.py --classes 100k 1M --batch 128 512 --out benchmarks/results/head_cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import facescale  # noqa: F401 - sets OMP_WAIT_POLICY (facescale/__init__.py); the config workers inherit it
from facescale.heads.allocations import LargestAllocation
from facescale.heads.gemm import ENV as GEMM_ENV
from facescale.heads.gemm import fp32_backend
from facescale.runtime import bf16_supported

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling helpers, also when loaded by path
from load_probe import PROBE_SHAPE, QuietGate, probe_ms  # noqa: E402

DIM, LR, MOMENTUM, WEIGHT_DECAY, SCALE, MARGIN = 512, 0.1, 0.9, 5e-4, 64.0, 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 1024**3


# ----------------------------------------------------------------------------------------------- helpers
def parse_count(text: str) -> int:
    """'100k' -> 100000, '1M' -> 1000000, '2000' -> 2000."""
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def current_rss() -> int:
    """Resident bytes now (from /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux clear_refs 5); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes since start or since the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of milliseconds."""
    return {"min": min(values), "med": statistics.median(values), "max": max(values)}


def pick_device(name: str) -> torch.device:
    """'auto' = CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GemmFloor:
    """The three matmuls of one step at one shape, on the head's GEMM backend (heads/gemm.py: oneDNN for fp32
    on the CPU where torch has it) and in its forms (the forward in the head's blocks, d-centers in the
    optimizer's row blocks), into preallocated outputs where the backend writes into buffers. oneDNN's fresh
    forward blocks are not copied anywhere: the head scales each into its logits buffer in the pass it makes
    over the cosines anyway (heads/norm_linear.py)."""

    def __init__(
        self, weight: torch.Tensor, batch: int, dtype: torch.dtype, block_rows: int | None = None
    ) -> None:
        from facescale.heads.gemm import matmul
        from facescale.heads.norm_linear import cosine_blocks, cosine_gemm, fresh_cosine_blocks

        self.cosine_blocks, self.cosine_gemm, self.matmul = cosine_blocks, cosine_gemm, matmul
        self.block_rows = max(1, block_rows or len(weight))  # d-centers: one product unless blocks are given
        gen = torch.Generator().manual_seed(7)
        device = weight.device
        self.weight = weight  # [C', D], read only
        self.x = torch.randn(batch, DIM, generator=gen).to(device=device, dtype=dtype)
        grad = torch.randn(batch, weight.shape[0], generator=gen).div_(weight.shape[0])
        self.grad = grad.to(device=device, dtype=dtype)
        self.logits = torch.empty(batch, weight.shape[0], dtype=dtype, device=device)
        self.grad_x = torch.empty(batch, DIM, dtype=dtype, device=device)
        self.grad_w = torch.empty(weight.shape[0], DIM, dtype=dtype, device=device)
        self.fresh_blocks = fresh_cosine_blocks(self.x, weight)

    def run_ms(self) -> float:
        synchronize(self.weight.device)
        t0 = time.perf_counter()
        if self.fresh_blocks:  # forward, as the head runs it
            for _ in self.cosine_blocks(self.x, self.weight):
                pass
        else:
            self.cosine_gemm(self.x, self.weight, self.logits)
        self.matmul(self.grad, self.weight, out=self.grad_x)  # d-embeddings, on the head's backend
        for lo in range(0, len(self.weight), self.block_rows):  # d-centers, in the optimizer's blocks
            hi = lo + self.block_rows
            self.matmul(self.grad[:, lo:hi].t(), self.x, scratch=self.grad_w[lo:hi])
        synchronize(self.weight.device)
        return (time.perf_counter() - t0) * 1e3


class StreamBandwidth:
    """Bytes/s of an in-place `a += s*b` (read a, read b, write a) over buffers larger than the caches,
    with the step's threads: the rate an optimizer's read-modify-write pass can reach on this machine."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 1024**2) -> None:
        self.a = torch.zeros(nbytes // 4, device=device)
        self.b = torch.ones(nbytes // 4, device=device)

    def run_gbs(self) -> float:
        synchronize(self.a.device)
        t0 = time.perf_counter()
        self.a.add_(self.b, alpha=1e-6)
        synchronize(self.a.device)
        return 3 * self.a.numel() * 4 / (time.perf_counter() - t0) / 1e9


def step_traffic_bytes(classes: int, width: int, mode: str, center_bytes: int, state_bytes: int) -> int:
    """Bytes a step must move: the forward reads the C' sampled rows; the update reads and writes rows and
    their optimizer state (bf16 residual included) — the sampled ones (sparse) or the whole shard (dense).
    `center_bytes` / `state_bytes`: bytes of one row of centers / of all state buffers."""
    updated = width if mode == "sparse" else classes
    return width * center_bytes + 2 * updated * (center_bytes + state_bytes)


class PeakMemory:
    """Peak bytes above a baseline: CUDA allocator statistics, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base, self.reset = torch.cuda.memory_allocated(device), True
        else:
            self.base, self.reset = current_rss(), reset_peak_rss()

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "VmHWM after clear_refs" if self.reset else "ru_maxrss"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        used = peak_rss() if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return used - self.base


def gemm_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The embeddings' (so the GEMMs') dtype: the storage dtype, except that under `--gemm auto` bf16 storage
    on a device without native bf16 GEMMs gets fp32 embeddings, as `precision: auto` gives it there (the head
    widens its sampled rows 1024 at a time for fp32 GEMMs; an emulated bf16 GEMM is ~8x slower than fp32)."""
    storage = DTYPES[cfg["dtype"]]
    native = storage != torch.bfloat16 or bf16_supported(pick_device(cfg.get("device", "cpu")))
    return storage if native or cfg.get("gemm", "auto") == "storage" else torch.float32


def build_head(cfg: dict[str, Any], classes: int, device: torch.device) -> Any:
    """The benchmarked Partial FC head (ArcFace margin) for one configuration, at `classes` classes."""
    from facescale.config.schema import MarginConfig
    from facescale.heads.margins import build_margin
    from facescale.heads.partial_fc import PartialFCHead

    return PartialFCHead(
        classes,
        DIM,
        build_margin(MarginConfig(type="arcface", s=SCALE, m2=MARGIN)),
        seed=0,
        sample_rate=cfg["rate"],
        update=cfg["mode"],
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        storage_dtype=DTYPES[cfg["dtype"]],
        device=device,
    )


def warm_libraries(cfg: dict[str, Any], device: torch.device) -> None:
    """Pay what any process pays once before the memory baseline, so peak - baseline is the head's own
    memory: one step of a tiny head of the same kind loads the fused-kernel library and pages in the code of
    every op the step runs (a few MB of libtorch), and its margin backward's autograd.grad imports sympy
    (~33 MB of modules, on the first call with grad_outputs)."""
    tiny = build_head(cfg, 4096, device)
    x = torch.randn(8, DIM, device=device, dtype=gemm_dtype(cfg), requires_grad=True)
    loss, _ = tiny(x, torch.arange(8, device=device), 0)
    loss.backward()
    tiny.optimizer_step(LR)
    synchronize(device)


def settling_steps(head: Any, rate: float) -> int:
    """Untimed steps before timing a head that defers dense updates (heads/deferred_dense.py): a sampled row
    replays the steps it missed since it was last sampled (about 1/rate in the steady state), which a fresh
    head has not yet accumulated; 3/rate steps get the replay to ~95% of its steady length."""
    return math.ceil(3 / rate) if head.center_optimizer.deferred is not None and 0 < rate < 1 else 0


# ----------------------------------------------------------------------------------------------- workers
def run_head_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """One head configuration: warm-up (peak memory measured there), then timed steps alternating with the
    GEMM floor and the stream-bandwidth probe, so the ratios see the same machine load."""
    torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg.get("device", "cpu"))
    dtype = gemm_dtype(cfg)
    classes, batch = cfg["classes"], cfg["batch"]
    gen = torch.Generator().manual_seed(1)
    embeddings = [torch.randn(batch, DIM, generator=gen).to(device=device, dtype=dtype) for _ in range(4)]
    labels = [torch.randint(0, classes, (batch,), generator=gen).to(device) for _ in range(4)]
    warm_libraries(cfg, device)
    memory = PeakMemory(device)
    head = build_head(cfg, classes, device)
    state = head.center_optimizer.state_tensors()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    residual_bytes = sum(t.numel() * t.element_size() for n, t in state.items() if n == "center_residual")
    centers_bytes = head.centers.numel() * head.centers.element_size()

    def step(index: int) -> dict[str, float]:
        x = embeddings[index % 4].clone().requires_grad_()
        synchronize(device)
        t0 = time.perf_counter()
        loss, stats = head(x, labels[index % 4], index)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        head.optimizer_step(LR)
        synchronize(device)
        t3 = time.perf_counter()
        return {
            "fwd": (t1 - t0) * 1e3,
            "bwd": (t2 - t1) * 1e3,
            "opt": (t3 - t2) * 1e3,
            "step": (t3 - t0) * 1e3,
            "width": stats["num_sampled"],
        }

    warm = [step(i) for i in range(cfg["warmup"])]
    settle = settling_steps(head, cfg["rate"])
    for i in range(settle):  # deferred dense: reach the steady replay length before timing (untimed)
        step(cfg["warmup"] + i)
    peak_bytes = memory.peak()
    width = warm[-1]["width"]
    floor = GemmFloor(
        head.centers[:width] if dtype == head.centers.dtype else head.centers[:width].to(dtype),
        batch,
        dtype,
        head.center_optimizer.block_size(width, dtype, batch),
    )
    stream = StreamBandwidth(device, min(256 * 1024**2, max(64 * 1024**2, 2 * (centers_bytes + state_bytes))))
    steps, floors, bandwidths = [], [], []
    for i in range(cfg["steps"]):
        floors.append(floor.run_ms())
        bandwidths.append(stream.run_gbs())
        steps.append(step(cfg["warmup"] + settle + i))
    del floor, stream
    tracker = LargestAllocation()
    with tracker:
        step(10_000)
    logits_bytes = batch * width * 4
    theory = centers_bytes + state_bytes + logits_bytes
    step_ms = summary([s["step"] for s in steps])
    gemm_ms = summary(floors)
    traffic = step_traffic_bytes(
        classes, width, cfg["mode"], centers_bytes // classes, state_bytes // classes
    )
    bandwidth = statistics.median(bandwidths)
    memory_ms = traffic / (bandwidth * 1e9) * 1e3
    floor_med = max(gemm_ms["med"], memory_ms)
    gemm_flops = 6 * batch * width * DIM / (gemm_ms["med"] / 1e3)
    row_bytes = (centers_bytes + state_bytes) / classes  # per shard row, read and written by a dense update
    # dense is memory-bound when 2*C*row_bytes/BW > 6*B*r*C*D/F, i.e. below this batch x sample rate
    dense_crossover = 2 * row_bytes * gemm_flops / (6 * DIM * bandwidth * 1e9)
    return {
        **cfg,
        "kind": "head",
        "device": str(device),
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "num_sampled": width,
        "step_ms": step_ms,
        "phase_ms": {p: statistics.median(s[p] for s in steps) for p in ("fwd", "bwd", "opt")},
        "head_last_step_ms": getattr(head, "last_step_ms", None),
        "floor_ms": gemm_ms,
        "gemm_floor_ms": gemm_ms,
        "traffic_bytes": traffic,
        "stream_gbs": summary(bandwidths),
        "memory_floor_ms": memory_ms,
        "bound": "GEMM" if gemm_ms["med"] >= memory_ms else "memory",
        "step_floor_ms": floor_med,
        "step_over_floor": step_ms["med"] / floor_med,
        "step_over_gemm_floor": step_ms["med"] / gemm_ms["med"],
        "gemm_gflops": gemm_flops / 1e9,
        "dense_memory_bound_below_batch_x_rate": dense_crossover,
        "step_over_floor_per_round": [
            s["step"] / max(f, traffic / (g * 1e9) * 1e3)
            for s, f, g in zip(steps, floors, bandwidths, strict=True)
        ],
        "warmup_step_ms": [w["step"] for w in warm],
        "settling_steps": settle,
        "peak_bytes": peak_bytes,
        "peak_method": memory.method,
        "theory_bytes": theory,
        "theory": {
            "centers": centers_bytes,
            "optimizer_state": state_bytes - residual_bytes,
            "bf16_residual": residual_bytes,
            "sampled_logits": logits_bytes,
        },
        "peak_over_theory": peak_bytes / theory,
        "largest_alloc_elems": tracker.largest,
        "largest_alloc_op": tracker.largest_op,
        "shard_elems": classes * DIM,
        "cxd_alloc_per_step": tracker.largest >= classes * DIM,
    }


def full_fc_step(
    weight: torch.nn.Parameter,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """The obvious full FC: normalize W, linear, ArcFace margin, cross-entropy, SGD over all of W."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        cos = F.linear(F.normalize(x), F.normalize(weight)).float()
    target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    logits = cos.scatter(1, labels[:, None], torch.cos(torch.acos(target) + MARGIN)) * SCALE
    F.cross_entropy(logits, labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The obvious full-FC step for one (C, B, dtype), alternating with its own full-size GEMM floor."""
    torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg.get("device", "cpu"))
    dtype = gemm_dtype(cfg)
    classes, batch = cfg["classes"], cfg["batch"]
    gen = torch.Generator().manual_seed(1)
    memory = PeakMemory(device)
    weight = torch.nn.Parameter(torch.randn(classes, DIM, generator=gen).mul_(0.01).to(device))
    optimizer = torch.optim.SGD([weight], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    xs = [torch.randn(batch, DIM, generator=gen).to(device).requires_grad_() for _ in range(2)]
    labels = [torch.randint(0, classes, (batch,), generator=gen).to(device) for _ in range(2)]

    def step(i: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        full_fc_step(weight, optimizer, xs[i % 2], labels[i % 2], dtype)
        synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    warm = [step(i) for i in range(cfg["warmup"])]
    peak_bytes = memory.peak()
    floor = GemmFloor(weight.detach() if dtype == torch.float32 else weight.detach().to(dtype), batch, dtype)
    steps, floors = [], []
    for i in range(cfg["steps"]):
        floors.append(floor.run_ms())
        steps.append(step(i))
    step_ms, floor_ms = summary(steps), summary(floors)
    return {
        **cfg,
        "kind": "full_fc",
        "device": str(device),
        "step_ms": step_ms,
        "floor_ms": floor_ms,
        "step_over_floor": step_ms["med"] / floor_ms["med"],
        "warmup_step_ms": warm,
        "peak_bytes": peak_bytes,
    }


# ------------------------------------------------------------------------------------------ orchestration
def estimate_head_gib(classes: int, batch: int, rate: float, dtype: str) -> float:
    """Rough peak of a head config plus its floor buffers (for skipping what cannot fit)."""
    item = 2 if dtype == "bf16" else 4
    width = classes if rate >= 1.0 else int(rate * classes)
    state = 2 * classes * DIM * item
    transient = width * DIM * (4 + 2 * item) + 5 * batch * width * 4
    return (state + transient) / GIB


def estimate_full_gib(classes: int, batch: int) -> float:
    """Rough peak of the obvious full FC (fp32 W, grad, momentum, ~3 C x D and ~6 B x C temporaries)."""
    return (classes * DIM * 4 * 6 + 6 * batch * classes * 4) / GIB


def run_worker(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one config in a fresh Python process; a crash or timeout becomes an error record."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.time()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {**cfg, "error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - t0
    return result


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Configs in run order: per (C, B, dtype) group, the full FC first, then every (rate, mode)."""
    configs = []
    for classes in args.classes:
        for batch in args.batch:
            for dtype in args.dtypes:
                common = {"classes": classes, "batch": batch, "dtype": dtype, "threads": args.threads}
                common["gemm"] = getattr(args, "gemm", "auto")
                common["device"] = getattr(args, "device", "cpu")
                large = classes >= args.large_from
                if args.baseline_steps > 0:
                    full = {
                        **common,
                        "kind": "full_fc",
                        "warmup": 1,
                        "steps": args.baseline_steps_large if large else args.baseline_steps,
                    }
                    estimate = estimate_full_gib(classes, batch)
                    if estimate > args.max_gib:
                        full["skipped"] = f"estimated {estimate:.1f} GiB > --max-gib {args.max_gib}"
                    configs.append(full)
                for rate in args.rates:
                    for mode in args.modes:
                        cfg = {
                            **common,
                            "kind": "head",
                            "rate": rate,
                            "mode": mode,
                            "warmup": args.warmup,
                            "steps": args.steps_large if large else args.steps,
                        }
                        estimate = estimate_head_gib(classes, batch, rate, dtype)
                        if estimate > args.max_gib:
                            cfg["skipped"] = f"estimated {estimate:.1f} GiB > --max-gib {args.max_gib}"
                        configs.append(cfg)
    return configs


def cpu_model() -> str:
    """The host CPU as /proc/cpuinfo names it, with its family/model numbers (Linux; else platform's name)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def load_average() -> list[float]:
    return list(os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run the selected grid (one subprocess per config) and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", nargs="+", type=parse_count, default=[100_000, 1_000_000])
    parser.add_argument("--batch", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--rates", nargs="+", type=float, default=[1.0, 0.3, 0.1])
    parser.add_argument("--modes", nargs="+", choices=("dense", "sparse"), default=["dense", "sparse"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed head steps (peak RSS is read after)")
    parser.add_argument("--steps", type=int, default=3, help="timed head steps, each after one floor")
    parser.add_argument("--steps-large", type=int, default=2, help="timed head steps at C >= --large-from")
    parser.add_argument("--baseline-steps", type=int, default=2, help="timed full-FC steps; 0 = no baseline")
    parser.add_argument("--baseline-steps-large", type=int, default=1)
    parser.add_argument("--large-from", type=parse_count, default=1_000_000)
    parser.add_argument(
        "--gemm",
        choices=("auto", "storage"),
        default="auto",
        help="embeddings/GEMM dtype: auto = the storage dtype where it runs natively, else fp32 (what "
        "precision: auto runs); storage = always the storage dtype (bf16 emulated where not native)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--max-gib", type=float, default=14.0, help="skip configs estimated above this")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per config subprocess")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--append", action="store_true", help="add to an existing OUT.json instead")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on the CPU, start each case only after two load-probe readings in a row <= --quiet-below and "
        "run it again (at most twice more) when load came in (reading after it above, or its GEMM floor's "
        "median >10%% above its fastest round); wait at most this long in all (nothing runs if the first "
        "case never gets quiet); see benchmarks/load_probe.py",
    )
    parser.add_argument("--quiet-below", type=float, default=None, metavar="MS", help="with --wait-quiet")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wait_quiet > 0 and args.quiet_below is None:
        parser.error("--wait-quiet needs --quiet-below MS (the probe's quiet reading here plus a margin)")
    if args.worker:
        cfg = json.loads(args.worker)
        result = run_head_config(cfg) if cfg["kind"] == "head" else run_full_config(cfg)
        print(json.dumps(result))
        return result

    command = "python benchmarks/head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "command": command,
        # an fp32 backend asked for by name is part of what ran (heads/gemm.py)
        "environment": f"{GEMM_ENV}={os.environ[GEMM_ENV]} " if os.environ.get(GEMM_ENV) else "",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": str(pick_device(args.device)),
            "device_name": torch.cuda.get_device_name(pick_device(args.device))
            if pick_device(args.device).type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD torch's kernels use
            "cpu_model": cpu_model(),  # ratios move with the host: e.g. bf16 GEMMs ran 2x faster on Zen 5
            "fp32_gemm": fp32_backend() if pick_device(args.device).type == "cpu" else "torch",
            "bf16_native": bf16_supported(pick_device(args.device)),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_"))},
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],  # the workers inherit it
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_start": load_average(),
        "results": [],
    }
    probing = pick_device(args.device).type == "cpu"  # outside load matters on a shared CPU
    gate = None
    if probing:
        report["load_probe"] = {"shape": list(PROBE_SHAPE), "threads": args.threads}
        if args.wait_quiet > 0:
            gate = QuietGate(args.quiet_below, args.wait_quiet, lambda: probe_ms(args.threads))
            if not gate.wait()[0]:
                raise SystemExit(
                    f"head.py: the machine stayed loaded for {gate.waited_s:.0f} s (load probe readings "
                    f"{gate.readings} ms; wanted two in a row <= {args.quiet_below} ms), so nothing was run: "
                    "run it again later, or without --wait-quiet to measure anyway"
                )
            report["load_probe"]["below_ms"] = args.quiet_below
        report["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")  # when the grid starts, after any wait
        report["load_average_start"] = load_average()
    for cfg in plan(args):
        if "skipped" in cfg:
            result = cfg
        elif probing:
            result = run_worker_probed(cfg, args, gate)
        else:
            result = run_worker(cfg, args.timeout)
        report["results"].append(result)
        print(one_line(result), flush=True)
    report["load_average_end"] = load_average()
    if gate is not None:
        report["load_probe"].update(waited_s=gate.waited_s, readings_ms=gate.readings)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    add_speedups(report["results"])
    if args.out is not None and args.append and args.out.with_suffix(".json").exists():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        report["runs"] = previous.get("runs", [_run_info(previous)]) + [_run_info(report)]
        report["results"] = previous["results"] + report["results"]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
    return report


RERUNS = 2  # with --wait-quiet, a case measured under load (see `loaded_inside`) runs again
FLOOR_SPREAD = 1.10  # median / fastest GEMM floor of a case above this: load came and went inside the case


def loaded_inside(result: dict[str, Any]) -> bool:
    """Whether load hit the case between its probe readings: its GEMM floor, timed once per round, has a
    median more than 10% above its fastest round (quiet cases of the committed runs: 1.01-1.09; cases with
    load inside them: 1.17-1.82)."""
    floor = result.get("floor_ms")
    return bool(floor) and floor["med"] > FLOOR_SPREAD * floor["min"]


def measured_under_load(result: dict[str, Any], below_ms: float) -> bool:
    """A probed case's verdict: a reading before or after it above `below_ms`, or load inside it."""
    probe = result["load_probe_ms"]
    return max(probe["before"], probe["after"]) > below_ms or loaded_inside(result)


def run_worker_probed(
    cfg: dict[str, Any], args: argparse.Namespace, gate: QuietGate | None
) -> dict[str, Any]:
    """`run_worker` with the load probe read before and after the case; with a gate, the case starts when
    quiet and runs again (at most RERUNS more times, within the gate's budget) when it was measured under
    load. The result records both readings and the number of runs."""
    for run in range(1, RERUNS + 2):
        quiet, before = (True, probe_ms(args.threads)) if gate is None else gate.wait()
        result = run_worker(cfg, args.timeout)
        after = probe_ms(args.threads)
        result["load_probe_ms"] = {"before": before, "after": after, "runs": run}
        if gate is None or not quiet or not gate.time_left():
            break  # no gate, or its budget is spent: this run stands (marked if loaded)
        if not measured_under_load(result, gate.below_ms):
            break
    return result


def _run_info(report: dict[str, Any]) -> dict[str, Any]:
    """The per-invocation fields of a report (kept per run when results are appended)."""
    keys = ("command", "environment", "started", "finished")
    keys += ("load_average_start", "load_average_end", "load_probe")
    return {key: report.get(key) for key in keys}


def add_speedups(results: list[dict[str, Any]]) -> None:
    """speed-up = full-FC median step / head median step, same (C, B, dtype) group of this run."""
    full = {(r["classes"], r["batch"], r["dtype"]): r for r in results if r.get("kind") == "full_fc"}
    for r in results:
        base = full.get((r["classes"], r["batch"], r["dtype"]))
        if r.get("kind") == "head" and "step_ms" in r and base is not None and "step_ms" in base:
            r["speedup_vs_full_fc"] = base["step_ms"]["med"] / r["step_ms"]["med"]


def _probe_lines(probe: dict[str, Any] | None) -> list[str]:
    """How the run read outside load (benchmarks/load_probe.py), as a paragraph; none on a GPU."""
    if not probe:
        return []
    rows, dim, cols = probe["shape"]
    text = (
        f"Load probe: the median ms of an fp32 [{rows}, {dim}] x [{dim}, {cols}] GEMM on {probe['threads']} "
        "threads, read before and after every case (column *load ms*; higher = busier machine)"
    )
    if "below_ms" in probe:
        text += (
            f". Each case started after two readings in a row <= {probe['below_ms']} ms and ran again (at "
            f"most {RERUNS} more times) when the reading after it was above; the grid waited "
            f"{probe.get('waited_s', 0):.0f} s for quiet in all. A case also ran again when its GEMM "
            f"floor's median was more than {FLOOR_SPREAD - 1:.0%} above its fastest round (load inside the "
            "case). A † marks a case still measured under load when the wait budget ran out: not one to cite"
        )
    return [text + ".", ""]


def _load_cell(r: dict[str, Any], below_ms: float | None) -> str:
    """'before / after' load readings of a case, its number of runs when above one, † when loaded."""
    probe = r.get("load_probe_ms")
    if not probe:
        return "n/a"
    text = f"{probe['before']:.1f} / {probe['after']:.1f}"
    if probe["runs"] > 1:
        text += f" ({probe['runs']} runs)"
    if below_ms is not None and measured_under_load(r, below_ms):
        text += " †"
    return text


def _cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]['min']:.0f} / {r[key]['med']:.0f} / {r[key]['max']:.0f}"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable table of a report (what benchmarks/results/head_cpu.md holds)."""
    lines = [
        "# Partial FC head benchmark (world size 1, D = 512)",
        "",
        "Produced by (from the repo root):",
        "",
    ]
    for run in report.get("runs", [_run_info(report)]):
        lines += [
            f"    {run.get('environment') or ''}PYTHONPATH=. .venv/bin/{run['command']}",
            "",
            f"(started {run['started']}, finished {run.get('finished', '?')}; load average 1/5/15 min "
            f"{_loads(run['load_average_start'])} at start, "
            f"{_loads(run.get('load_average_end') or [])} at end)",
            "",
            *_probe_lines(run.get("load_probe")),
        ]
    machine = report["machine"]
    lines += [
        f"Device {machine.get('device', 'cpu')} ({machine.get('device_name', '?')}), "
        f"{machine['cpu_count']} CPUs, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"{machine.get('cpu_model', '?')}, SIMD {machine.get('cpu_capability', '?')}, "
        f"native bf16 GEMM {_yes(machine.get('bf16_native'))}, "
        f"fp32 GEMMs on {machine.get('fp32_gemm', 'torch')} (heads/gemm.py), "
        f"OMP_WAIT_POLICY={machine.get('omp_wait_policy', 'unset')} (as facescale's processes run). "
        "Ratios are taken within one process, the head's steps alternating with the GEMM floor and the "
        "stream-bandwidth probe. floor = max(GEMM floor, memory floor); memory floor = the bytes the step "
        "must move (the sampled rows read by the forward, plus rows, optimizer state and bf16 residual read "
        "and written by the update: sampled rows for sparse, the whole shard for dense) / stream bandwidth "
        "(in-place a += s*b, measured in the same run). bf16 theory includes the bf16 residual that "
        'keeps bf16 centers on the fp32 trajectory. dtype: the centers\' storage; "(fp32 GEMM)": fp32 '
        "embeddings and fp32 GEMMs and floor, as `precision: auto` runs bf16 storage on a device without "
        "native bf16 (`--gemm auto`).",
        "",
        "| C | B | dtype | rate | mode | C' | step ms min/med/max | GEMM floor ms med | traffic GB "
        "| stream GB/s | memory floor ms | bound | **step/floor** | fwd / bwd / opt ms | peak GiB "
        "| theory GiB (residual) | **peak/theory** | largest alloc / (C*D) | vs full FC | load ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    below_ms = (report.get("load_probe") or {}).get("below_ms")  # the --quiet-below threshold, if any
    for r in report["results"]:
        if r.get("kind") != "head":
            continue
        head = f"| {r['classes']:,} | {r['batch']} | {_dtypes(r)} | {r['rate']} | {r['mode']} "
        if "skipped" in r or "error" in r:
            lines.append(head + f"| {r.get('skipped') or r.get('error')} |" + " |" * 14)
            continue
        phases = " / ".join(f"{r['phase_ms'][p]:.0f}" for p in ("fwd", "bwd", "opt"))
        speedup = f"{r['speedup_vs_full_fc']:.1f}x" if "speedup_vs_full_fc" in r else "n/a"
        residual = r["theory"].get("bf16_residual", 0) / GIB
        lines.append(
            head + f"| {r['num_sampled']:,} | {_cell(r, 'step_ms')} | {r['floor_ms']['med']:.1f} "
            f"| {r['traffic_bytes'] / 1e9:.2f} | {r['stream_gbs']['med']:.1f} | {r['memory_floor_ms']:.1f} "
            f"| {r['bound']} | **{r['step_over_floor']:.2f}** | {phases} | {r['peak_bytes'] / GIB:.2f} "
            f"| {r['theory_bytes'] / GIB:.2f} ({residual:.2f}) | **{r['peak_over_theory']:.2f}** "
            f"| {r['largest_alloc_elems'] / r['shard_elems']:.3f} | {speedup} | {_load_cell(r, below_ms)} |"
        )
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in report["results"]:
        if r.get("kind") == "head" and "dense_memory_bound_below_batch_x_rate" in r:
            groups.setdefault((r.get("device", "cpu"), r["dtype"], r["batch"]), []).append(r)
    crossovers = [
        (*key, *(statistics.median(_value(r, name) for r in rs) for name in CROSSOVER_FIELDS))
        for key, rs in sorted(groups.items())
    ]
    if crossovers:
        lines += [
            "",
            "Dense or sparse: an every-step dense update (the torch path, e.g. on CUDA) streams the whole "
            "shard (rows + state, read and written), so it is memory-bound, and slower than sparse by about "
            "that traffic, when B x rate < (bytes per row element of centers + state) x GEMM rate / (3 x "
            "stream bandwidth); above it the step is GEMM-bound either way. On the CPU kernels dense SGD "
            "defers the unsampled rows' steps (each row replays the steps it missed when it is next read, "
            "bit-identical; facescale/heads/deferred_dense.py), so it costs about a sparse step plus that "
            "replay, and may beat the memory floor above, which still counts the whole shard. Every 1024 "
            "steps and at each checkpoint all rows are brought up to date (not in the timed steps). From "
            "this run's measured rates:",
            "",
            "| device | dtype | B | GEMM GFLOP/s | stream GB/s | dense memory-bound below B x rate (med) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {v} | {d} | {b} | {f:.0f} | {w:.1f} | {x:.0f} |" for v, d, b, f, w, x in crossovers]
    lines += target_lines(report["results"])
    if not any(r.get("kind") == "full_fc" for r in report["results"]):
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Obvious full FC (normalize W, linear, ArcFace, cross-entropy, torch.optim.SGD over all of W):",
        "",
        "| C | B | dtype | step ms min/med/max | full-size floor ms | step/floor | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if r.get("kind") != "full_fc":
            continue
        head = f"| {r['classes']:,} | {r['batch']} | {r['dtype']} "
        if "skipped" in r or "error" in r:
            lines.append(head + f"| {r.get('skipped') or r.get('error')} | | | |")
            continue
        lines.append(
            head + f"| {_cell(r, 'step_ms')} | {r['floor_ms']['med']:.0f} "
            f"| {r['step_over_floor']:.2f} | {r['peak_bytes'] / GIB:.2f} |"
        )
    return "\n".join(lines) + "\n"


STEP_TARGETS = {"fp32": 1.3, "bf16": 1.5}  # issue 16: median step / floor at C >= 100k, r in {0.1, 0.3}
PEAK_TARGET = 1.2


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """Issue 16's targets over this report's cases at C >= 100k: worst step/floor per (dtype, mode), worst
    peak/theory per dtype, each with met / missed."""
    heads = [r for r in results if r.get("kind") == "head" and "step_ms" in r and r["classes"] >= 100_000]
    heads = [r for r in heads if r["rate"] in (0.1, 0.3)]
    if not heads:
        return []
    lines = [
        "",
        "Targets (issue 16; C >= 100k, rate 0.1 and 0.3; worst case of this report):",
        "",
        "| dtype | mode | cases | worst step/floor (case) | target | verdict | worst peak/theory | target "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in sorted({r["dtype"] for r in heads}):
        for mode in sorted({r["mode"] for r in heads}):
            group = [r for r in heads if r["dtype"] == dtype and r["mode"] == mode]
            if not group:
                continue
            worst = max(group, key=lambda r: r["step_over_floor"])
            peak = max(r["peak_over_theory"] for r in group)
            limit = STEP_TARGETS.get(dtype, 1.3)
            case = f"B={worst['batch']}, r={worst['rate']}"
            lines.append(
                f"| {dtype} | {mode} | {len(group)} | {worst['step_over_floor']:.2f} ({case}) | {limit} "
                f"| {'met' if worst['step_over_floor'] <= limit else 'missed'} | {peak:.2f} | {PEAK_TARGET} "
                f"| {'met' if peak <= PEAK_TARGET else 'missed'} |"
            )
    return lines


CROSSOVER_FIELDS = ("gemm_gflops", "stream_gbs", "dense_memory_bound_below_batch_x_rate")


def _value(r: dict[str, Any], name: str) -> float:
    value = r[name]
    return value["med"] if isinstance(value, dict) else value


def _yes(flag: bool | None) -> str:
    return "?" if flag is None else ("yes" if flag else "no (emulated; --gemm auto runs fp32 GEMMs)")


def _dtypes(r: dict[str, Any]) -> str:
    """The storage dtype, and the GEMM dtype after it when they differ (bf16 storage, fp32 GEMMs)."""
    gemm = {"float32": "fp32", "bfloat16": "bf16"}.get(r.get("gemm_dtype", ""), r["dtype"])
    return r["dtype"] if gemm == r["dtype"] else f"{r['dtype']} ({gemm} GEMM)"


def _loads(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) or "?"


def one_line(r: dict[str, Any]) -> str:
    """A progress line for the console."""
    name = f"{r['kind']:7s} C={r['classes']:>8d} B={r['batch']:>3d} {r['dtype']}"
    if r.get("kind") == "head":
        name += f" r={r['rate']:.1f} {r['mode']:6s}"
    if "skipped" in r or "error" in r:
        return f"{name}  {r.get('skipped') or r.get('error')}"
    text = f"{name}  step {r['step_ms']['med']:9.1f} ms  floor {r['floor_ms']['med']:9.1f}"
    if r["kind"] == "head":
        text = f"{name}  step {r['step_ms']['med']:9.1f} ms  GEMM {r['floor_ms']['med']:8.1f}"
        text += (
            f"  memory {r['memory_floor_ms']:8.1f} ({r['stream_gbs']['med']:.0f} GB/s) -> {r['bound']}-bound"
        )
    text += f"  x{r['step_over_floor']:.2f}"
    if r["kind"] == "head":
        text += f"  peak {r['peak_bytes'] / GIB:.2f} GiB ({r['peak_over_theory']:.2f}x)"
        text += f"  CxD {r['cxd_alloc_per_step']}"
    if "load_probe_ms" in r:
        text += f"  load {r['load_probe_ms']['before']:.1f}/{r['load_probe_ms']['after']:.1f} ms"
        text += f" x{r['load_probe_ms']['runs']}"
    return text + f"  [{r.get('wall_s', 0):.0f} s]"


if __name__ == "__main__":
    main()
