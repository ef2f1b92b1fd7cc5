"""Whole training step on W CPU ranks: facescale (DeepSpeed engine + head + loader) against a plain DDP loop.

Per backbone (r18 at 112 px, the demo net) and class count (10k, 200k), every rank builds, side by side:
  - `plain fp32`: the arcface_torch-style step: the same backbone in torch DDP (broadcast_buffers off,
    16 MB buckets), fp32 eager, the same facescale head fed the live embeddings, one `loss.backward()`,
    `clip_grad_norm_` 5, the same torch optimizer, batches taken beforehand from the facescale loader and
    cycled from memory;
  - `plain bf16`: the same under `torch.autocast(bfloat16)` around the backbone forward;
  - `facescale fp32` / `facescale auto`: a real `Trainer` (the DeepSpeed engine at configs/synthetic.yaml's
    ZeRO stage 0 with the overlapped bucketed all-reduce, loss guard, surrogate backward, hand-off) with
    deepspeed.precision fp32 / auto (auto = bf16 where the device has it natively, the default); its head
    swapped for one of C classes; fed the plain loop's in-memory batches, so the difference is the engine's,
    the surrogate's and the hand-off's; steps run through the trainer's own step function;
  - `facescale auto + loader`: the default step reading its shards through its own loader;
  - `facescale auto ZeRO-1`: the default step with deepspeed.zero_stage=1 (what the r100/r200 recipes use);
  - `facescale compile` (with --compile MODEL): precision auto plus `model.compile: true`; its first step
    (the compile) is reported apart; torch's compile caches start empty in each run (a temporary
    TORCHINDUCTOR_CACHE_DIR; --warm-compile-cache keeps the user's), so the first group's figure is a cold
    compile and later groups of the same net reuse its graphs.
Cases run interleaved, one step each per round in a shuffled order, so load lands on all of them; ratios are
of medians in the same run. Then a few instrumented steps per case say where the time goes (collectives timed
synchronously, so the breakdown is a little slower than the headline): data wait, backbone forward, head
(forward, backward and its optimizer, with its own collectives), backbone backward, all-reduce (backbone
gradients, ZeRO's all-gather), backbone optimizer, other (surrogate, loss guard, hand-off, bookkeeping).
Writes OUT.json/.md.

    PYTHONPATH=. .venv/bin/python benchmarks/step.py --out benchmarks/results/step_cpu
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("data", "forward", "head", "backward", "allreduce", "optimizer", "other")
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter",
               "all_gather", "broadcast", "reduce", "all_to_all_single")
LR = 0.01  # small and constant: no step may go non-finite (the loss guard would change what is timed)


def parse_count(text: str) -> int:
    """'10k' -> 10000, '200k' -> 200000, '1M' -> 1000000."""
    scale = {"k": 1000, "m": 1000000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


class PhaseClock:
    """Seconds per phase of instrumented steps; collectives are timed (and waited for) where they run."""

    def __init__(self) -> None:
        self.phase = "other"  # outside any span, collectives are not moved (the head's, the loss guard's)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.comm = 0.0

    @contextmanager
    def span(self, phase: str):
        """Time a phase (they do not nest); collectives inside it count as `allreduce`, except the head's."""
        self.phase, self.comm = phase, 0.0
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            if phase == "head":
                self.seconds["head"] += elapsed
            else:
                self.seconds[phase] += elapsed - self.comm
                self.seconds["allreduce"] += self.comm
            self.phase = "other"

    def add_comm(self, seconds: float) -> None:
        if self.phase != "other":
            self.comm += seconds


@contextmanager
def timed_collectives(clock: PhaseClock):
    """Within, torch.distributed's collectives run synchronously and report their time to `clock`."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            work = fn(*args, **kwargs)
            if kwargs.get("async_op") and work is not None:
                work.wait()
            clock.add_comm(time.perf_counter() - started)
            return work
        return timed

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ----------------------------------------------------------------------------------------------- cases


class FacescaleCase:
    """A real Trainer (engine, loader, step function) with a head of `classes` centers."""

    def __init__(self, cfg, env, classes: int, batches: list | None = None) -> None:
        from facescale.heads import build_head
        from facescale.runtime import select_runtime
        from facescale.train.trainer import Trainer

        # as facescale/train/run.py does: the engine's precision is the runtime's, resolved from the config
        self.trainer = Trainer(cfg, env, select_runtime(env.local_rank, cfg.deepspeed.precision))
        head = build_head(cfg.head, classes, cfg.model.embedding_size, seed=cfg.schedule.seed)
        self.trainer.head = self.trainer.mode.head = head
        self.batches = self.trainer._batches() if batches is None else itertools.cycle(batches)
        self.step_index = 0

    def step(self, clock: PhaseClock | None = None) -> None:
        from facescale.modes import StepContext
        from facescale.train.step import train_step

        t = self.trainer
        engine = t.engine
        if clock is not None:
            for name, phase in (("forward", "forward"), ("backward", "backward"), ("step", "optimizer")):
                setattr(engine, name, _timed(getattr(engine, name), clock, phase))
        try:
            ctx = StepContext(engine, self.step_index, LR, LR * t.cfg.head.lr_scale, t.env.world_size,
                              t.cfg.schedule.grad_accumulation, time.perf_counter)
            out = train_step(t.mode, self.batches, ctx)
        finally:
            for name in ("forward", "backward", "step"):
                engine.__dict__.pop(name, None)
        if out.skipped:
            raise RuntimeError("a benchmark step was skipped by the loss guard; lower LR")
        if clock is not None:
            clock.seconds["data"] += out.data_wait_s
            clock.seconds["head"] += out.head_s
        self.step_index += 1

    def take_batches(self, count: int) -> list:
        return [next(self.batches) for _ in range(count)]


def _timed(fn: Callable, clock: PhaseClock, phase: str) -> Callable:
    def timed(*args, **kwargs):
        with clock.span(phase):
            return fn(*args, **kwargs)
    return timed


class PlainCase:
    """The arcface_torch-style loop: DDP backbone, the same head on live embeddings, one backward."""

    def __init__(self, cfg, classes: int, batches: list, bf16: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from facescale.heads import build_head
        from facescale.models.registry import build_backbone
        from facescale.train.trainer import build_backbone_optimizer

        torch.manual_seed(cfg.schedule.seed)
        backbone = build_backbone(cfg.model)
        # buffers not re-sent every forward, as arcface_torch runs it; torch 2.13 renamed the keyword
        no_buffer_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        self.ddp = DistributedDataParallel(backbone, bucket_cap_mb=16, **{no_buffer_sync: False})
        self.timing: PhaseClock | None = None
        self.ddp.register_comm_hook(self, _allreduce_hook)
        self.optimizer = build_backbone_optimizer(cfg, backbone.parameters())
        self.head = build_head(cfg.head, classes, cfg.model.embedding_size, seed=cfg.schedule.seed)
        self.batches, self.bf16, self.clip = itertools.cycle(batches), bf16, cfg.optim.grad_clip
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self.step_index = 0

    def step(self, clock: PhaseClock | None = None) -> None:
        self.timing = clock
        span = clock.span if clock is not None else _no_span
        with span("data"):
            images, labels = next(self.batches)
        for group in self.optimizer.param_groups:
            group["lr"] = LR
        self.head.zero_grad()
        with span("forward"), torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            embeddings = self.ddp(images)
        marks: dict[str, float] = {}
        embeddings = embeddings.float()
        if clock is not None:
            embeddings.register_hook(lambda _grad: marks.update(head_done=time.perf_counter()))
        with span("head"):
            loss, _ = self.head(embeddings, labels, self.step_index)
        started = time.perf_counter()
        with span("backward"):
            loss.backward()
        if clock is not None:  # the head's share of the one backward moves to "head" (its reduce-scatter of
            # the embedding gradients, B x D floats, stays in "allreduce")
            head_backward = marks.get("head_done", started) - started
            clock.seconds["backward"] -= head_backward
            clock.seconds["head"] += head_backward
        with span("optimizer"):
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with span("head"):
            self.head.optimizer_step(LR)
        if not torch.isfinite(loss):
            raise RuntimeError("a plain-loop step went non-finite; lower LR")
        self.step_index += 1


@contextmanager
def _no_span(_phase: str):
    yield


def _allreduce_hook(case: PlainCase, bucket):
    """DDP's mean all-reduce; synchronous and timed when the case is instrumented."""
    buffer, world = bucket.buffer(), dist.get_world_size()
    if case.timing is None:
        return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0].div_(world))
    dist.all_reduce(buffer)  # timed by timed_collectives
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer.div_(world))
    return future


# -------------------------------------------------------------------------------------------- one rank


def _is_iresnet(model: str) -> bool:
    """iresnets take --batch-r18 and --rounds; the other (small) nets --batch-demo and --demo-rounds."""
    return model.startswith("r")


def _config(args, data_dir: str, model: str, precision: str, compile_: bool, run_dir: str, sets: list):
    from facescale.config.load import load_config

    batch = args.batch_r18 if _is_iresnet(model) else args.batch_demo
    sets = [
        *args.set, *sets,
        f"data.shards={data_dir}", "eval.bins=[]", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "checkpoint.resume=none", f"model.name={model}", f"deepspeed.precision={precision}",
        f"schedule.global_batch_size={batch * args.ranks}", "schedule.warmup_steps=0",
        f"model.compile={str(compile_).lower()}", f"model.embedding_size={args.embedding}",
    ]
    return load_config("configs/synthetic.yaml", sets)


def _group(args, data_dir: str, model: str, classes: int, env, runtime, work: Path) -> dict:
    """All cases of one (backbone, classes): build, warm up, interleaved timed rounds, instrumented steps."""
    from facescale.runtime import resolve_precision

    auto = resolve_precision("auto", runtime.device)
    cases: dict[str, object] = {}
    # (name, precision, compile, batches from the real loader): the others cycle the plain loop's batches from
    # memory, so their difference to the plain loop is the engine, the surrogate backward and the hand-off
    # (and extra settings: ZeRO-1, as the big recipes use, against the config's stage)
    specs = [("facescale fp32", "fp32", False, False, []), ("facescale auto", "auto", False, False, []),
             ("facescale auto + loader", "auto", False, True, []),
             ("facescale auto ZeRO-1", "auto", False, False, ["deepspeed.zero_stage=1"])]
    if model in args.compile:
        specs.append(("facescale compile", "auto", True, False, []))
    batches: list | None = None
    for name, precision, compile_, loader, sets in specs:
        run_dir = work / f"{model}_{classes}_{name.replace(' ', '_').replace('+', 'and')}"
        cfg = _config(args, data_dir, model, precision, compile_, str(run_dir), sets)
        case = FacescaleCase(cfg, env, classes, None if loader else batches)
        if batches is None:  # the first case: its loader's first batches are everyone's in-memory batches
            batches = case.take_batches(args.memory_batches)
            case.batches = itertools.cycle(batches)
        cases[name] = case
    cfg = cases["facescale fp32"].trainer.cfg
    cases["plain fp32"] = PlainCase(cfg, classes, batches, bf16=False)
    if auto == "bf16":
        cases["plain bf16"] = PlainCase(cfg, classes, batches, bf16=True)

    first_step: dict[str, float] = {}
    for name, case in cases.items():
        for i in range(args.warmup):
            started = time.perf_counter()
            case.step()
            if i == 0:
                first_step[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in cases}
    rounds = args.rounds if _is_iresnet(model) else args.demo_rounds
    for round_index in range(rounds):
        # a fresh order each round (the same on every rank): no case always follows the same neighbour
        # (e.g. a bf16 case right after an fp32 one whose freed activations the allocator has just returned)
        order = list(cases.items())
        random.Random(round_index).shuffle(order)
        for name, case in order:
            dist.barrier()
            started = time.perf_counter()
            case.step()
            times[name].append(time.perf_counter() - started)
    phases: dict[str, dict[str, float]] = {}
    for name, case in cases.items():
        clock = PhaseClock()
        elapsed = 0.0
        for _ in range(args.breakdown_steps):
            dist.barrier()
            started = time.perf_counter()
            with timed_collectives(clock):
                case.step(clock)
            elapsed += time.perf_counter() - started
        n = max(1, args.breakdown_steps)
        per = {k: v / n for k, v in clock.seconds.items()}
        per["other"] = elapsed / n - sum(v for k, v in per.items() if k != "other")
        per["total"] = elapsed / n
        phases[name] = per
    for case in cases.values():
        if isinstance(case, FacescaleCase):
            case.trainer.metrics.close()
    return {"model": model, "classes": classes, "auto_precision": auto, "times_s": times,
            "first_step_s": first_step, "phases_s": phases,
            "micro_batch": cfg.schedule.global_batch_size // args.ranks}


def _rank_main(rank: int, args, data_dir: str, port: int, queue, compile_cache: str | None) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    if compile_cache is not None:  # torch reads it when it first compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    torch.set_num_threads(args.threads)
    from facescale.parallel.init import init_distributed
    from facescale.runtime import select_runtime
    from launcher.env import DistEnv

    try:
        env = DistEnv(rank, rank, args.ranks, args.ranks, "127.0.0.1", port, "torchrun")
        runtime = select_runtime(rank, "auto")
        init_distributed(env, runtime, timeout_s=1800)
        groups = []
        with tempfile.TemporaryDirectory(prefix=f"step_bench_r{rank}_") as work:
            for model in args.models:
                for classes in args.classes:
                    groups.append(_group(args, data_dir, model, classes, env, runtime, Path(work)))
                    if rank == 0:
                        print(f"[step] {model} C={classes} done", flush=True)
        queue.put((rank, "ok", groups))
    except BaseException:  # noqa: BLE001 - the traceback is the report
        import traceback

        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- report


def summarize(groups: list[dict]) -> list[dict]:
    """Per group: median step per case; ratios are medians of per-round ratios (the cases of one round run
    back to back, so a load change mostly hits both sides of a ratio)."""
    rows = []
    for g in groups:
        times = g["times_s"]
        med = {name: statistics.median(ts) for name, ts in times.items()}

        def ratio(a: str, b: str, times=times) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        plain_auto = "plain bf16" if "plain bf16" in med else "plain fp32"
        row = {
            "model": g["model"], "classes": g["classes"], "median_s": med,
            "overhead_fp32": ratio("facescale fp32", "plain fp32") - 1,
            "overhead_auto": ratio("facescale auto", plain_auto) - 1,
            "speedup_auto_vs_plain_fp32": ratio("plain fp32", "facescale auto"),
            "overhead_auto_loader": ratio("facescale auto + loader", plain_auto) - 1,
            "speedup_auto_loader_vs_plain_fp32": ratio("plain fp32", "facescale auto + loader"),
            "overhead_auto_zero1": ratio("facescale auto ZeRO-1", plain_auto) - 1,
        }
        if "facescale compile" in med:
            row["speedup_compile_vs_plain_fp32"] = ratio("plain fp32", "facescale compile")
            row["compile_s"] = g["first_step_s"]["facescale compile"] - med["facescale compile"]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Whole training step: facescale vs a plain DDP loop (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['ranks']} ranks x {result['threads']} torch thread(s); auto precision here = "
        f"{result['groups'][0]['auto_precision']}; load average at start / end: "
        f"{result['load_start'][0]:.1f} / {result['load_end'][0]:.1f}; wall {result['wall_s']:.0f} s. "
        f"{result['note']}",
        "",
        "## Step time (median of interleaved rounds) and ratios",
        "",
        "| backbone | C | micro-batch | plain fp32 ms | plain bf16 ms | facescale fp32 ms "
        "| facescale auto ms | overhead fp32 | overhead auto | auto vs plain fp32 "
        "| with loader: auto ms / overhead / x plain fp32 | ZeRO-1: auto ms / overhead "
        "| compile: step ms / x plain fp32 / compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, row in zip(result["groups"], result["summary"], strict=True):
        med = row["median_s"]

        def ms(name: str, med=med) -> str:
            return f"{1000 * med[name]:.0f}" if name in med else "-"

        comp = "-"
        if "compile_s" in row:
            comp = (f"{ms('facescale compile')} / {row['speedup_compile_vs_plain_fp32']:.2f}x / "
                    f"{row['compile_s']:.0f}")
        lines.append(
            f"| {g['model']} | {g['classes']:,} | {g['micro_batch']} | {ms('plain fp32')} "
            f"| {ms('plain bf16')} | {ms('facescale fp32')} | {ms('facescale auto')} "
            f"| {100 * row['overhead_fp32']:+.1f}% | {100 * row['overhead_auto']:+.1f}% "
            f"| {row['speedup_auto_vs_plain_fp32']:.2f}x | {ms('facescale auto + loader')} / "
            f"{100 * row['overhead_auto_loader']:+.1f}% / {row['speedup_auto_loader_vs_plain_fp32']:.2f}x "
            f"| {ms('facescale auto ZeRO-1')} / {100 * row['overhead_auto_zero1']:+.1f}% | {comp} |"
        )
    lines += ["", "## Where the time goes (ms per step, instrumented steps, rank 0)", "",
              "| backbone | C | case | " + " | ".join(PHASES) + " | total |",
              "|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for g in result["groups"]:
        for name, per in g["phases_s"].items():
            cells = " | ".join(f"{1000 * per[p]:.0f}" for p in (*PHASES, "total"))
            lines.append(f"| {g['model']} | {g['classes']:,} | {name} | {cells} |")
    lines += [
        "",
        "Ratios are medians of per-round ratios. overhead fp32 = facescale fp32 / plain fp32 - 1; overhead "
        "auto = facescale auto / plain loop at the same precision - 1 (target <= +5%). auto vs plain fp32 = "
        "the arcface_torch-style eager fp32 step / facescale's default step (target >= 1.2x). Compile s = "
        "first compiled step - its median step (cold in the first group of a net: the run starts with empty "
        "compile caches unless --warm-compile-cache; later groups of that net reuse its graphs). The "
        "facescale cases cycle the plain loop's batches from memory, so their overhead is the engine's, the "
        "surrogate backward's and the hand-off's; `with loader` is the default step reading the shards "
        "through its loader (on a 2-core machine its decode workers share the cores with the step); "
        "`ZeRO-1` is the default step with deepspeed.zero_stage=1 instead of the config's stage.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["r18", "demo"])
    p.add_argument("--classes", nargs="+", type=parse_count, default=[10000, 200000])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--batch-r18", type=int, default=16, help="micro-batch per rank for iresnets")
    p.add_argument("--batch-demo", type=int, default=64, help="micro-batch per rank for the demo nets")
    p.add_argument("--embedding", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds for iresnets")
    p.add_argument("--demo-rounds", type=int, default=20, help="timed rounds for the other (fast) nets")
    p.add_argument("--breakdown-steps", type=int, default=2)
    p.add_argument("--memory-batches", type=int, default=4, help="batches the plain loop cycles from memory")
    p.add_argument("--compile", nargs="*", default=[], metavar="MODEL", help="also time model.compile: true")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="keep torch's compile caches (default: empty ones for the run: compile s is cold)")
    p.add_argument("--data", default=None, help="shard directory (default: synthesized into a temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the facescale cases (e.g. deepspeed.zero_stage=0)")
    p.add_argument("--note", default="", help="free text for the report (e.g. 'measured under load')")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    from launcher.ports import free_port

    t0, load_start = time.perf_counter(), list(os.getloadavg())
    with (tempfile.TemporaryDirectory(prefix="step_bench_data_") as tmp,
          tempfile.TemporaryDirectory(prefix="step_bench_compile_cache_") as compile_cache):
        data_dir = args.data or tmp
        cache = None if args.warm_compile_cache else compile_cache
        if args.data is None:
            from facescale.data.synth import synthesize

            synthesize(data_dir, identities=64, images_per_identity=8, holdout_identities=0, seed=5)
        ctx = torch.multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(rank, args, data_dir, port, queue, cache))
                 for rank in range(args.ranks)]
        for proc in procs:
            proc.start()
        results = {}
        for _ in procs:
            rank, status, value = queue.get()
            if status != "ok":
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        for proc in procs:
            proc.join()
    groups = results[0]
    result = {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/step.py " + " ".join(argv or sys.argv[1:]),
        "ranks": args.ranks, "threads": args.threads, "note": args.note,
        "load_start": load_start, "load_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t0,
        "groups": groups, "summary": summarize(groups),
    }
    text = markdown(result)
    print(text)
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
