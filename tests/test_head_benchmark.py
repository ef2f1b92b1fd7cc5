"""benchmarks/head.py at a tiny size (so the script cannot rot), and the head's fast paths it measures:
lazily formed center gradients, cached center norms and the per-step timing the trainer logs."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from facescale.config.schema import MarginConfig
from facescale.heads import gemm
from facescale.heads.margins import build_margin
from facescale.heads.norm_linear import inverse_row_norms
from facescale.heads.partial_fc import PartialFCHead

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str = "head"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_runs_a_tiny_grid_and_writes_json_and_markdown(tmp_path: Path) -> None:
    bench = _benchmark_module()
    out = tmp_path / "head_tiny"
    argv = ["--classes", "2000", "--batch", "16", "--rates", "1.0", "0.1", "--modes", "sparse",
            "--dtypes", "fp32", "--warmup", "1", "--steps", "1", "--baseline-steps", "1", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    bench.main(argv)
    report = json.loads(out.with_suffix(".json").read_text())
    heads = {r["rate"]: r for r in report["results"] if r["kind"] == "head"}
    full = [r for r in report["results"] if r["kind"] == "full_fc"]
    assert not [r for r in report["results"] if "error" in r], report["results"]
    assert set(heads) == {1.0, 0.1} and len(full) == 1
    assert heads[0.1]["num_sampled"] == 200 and heads[1.0]["num_sampled"] == 2000
    for r in heads.values():
        assert r["step_ms"]["med"] > 0 and r["floor_ms"]["med"] > 0 and r["speedup_vs_full_fc"] > 0
        assert r["theory_bytes"] > 0 and r["peak_bytes"] > 0
        assert r["head_last_step_ms"] > 0
    # at C = 2000 the whole shard is one optimizer block, so only the sampled step is free of C x D
    assert not heads[0.1]["cxd_alloc_per_step"], heads[0.1]["largest_alloc_op"]
    markdown = out.with_suffix(".md").read_text()
    assert "benchmarks/head.py --classes 2000" in markdown
    assert "| 2,000 | 16 | fp32 | 0.1 | sparse |" in markdown
    assert "Load probe: the median ms of an fp32 [128, 512] x [512, 10240] GEMM on 1 threads" in markdown
    for r in heads.values():  # outside load read around each case (benchmarks/load_probe.py)
        assert r["load_probe_ms"]["before"] > 0 and r["load_probe_ms"]["after"] > 0
        assert r["load_probe_ms"]["runs"] == 1
    assert "below_ms" not in report["load_probe"]
    machine = report["machine"]  # the host and the fp32 GEMM backend, which the ratios depend on
    assert machine["cpu_model"] and machine["cpu_model"] in markdown
    assert f"fp32 GEMMs on {machine['fp32_gemm']} (heads/gemm.py)" in markdown


def test_a_fp32_backend_asked_for_by_name_is_in_the_recorded_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(gemm.ENV, "torch")
    gemm.fp32_backend.cache_clear()
    try:
        bench = _benchmark_module()
        out = tmp_path / "head_torch_mm"
        bench.main([*_TINY_GRID, "--out", str(out)])
    finally:
        gemm.fp32_backend.cache_clear()
    markdown = out.with_suffix(".md").read_text()
    assert "    FACESCALE_CPU_FP32_GEMM=torch PYTHONPATH=. .venv/bin/python benchmarks/head.py --" in markdown
    assert "fp32 GEMMs on torch (heads/gemm.py)" in markdown


def _scripted(readings: list[float], then: float | None = None):
    """A probe that returns `readings` in order, then `then` for ever (None: no more readings allowed)."""
    remaining = list(readings)

    def probe() -> float:
        if not remaining and then is not None:
            return then
        return remaining.pop(0)

    return probe, remaining


class _FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_quiet_gate_needs_two_quiet_readings_in_a_row() -> None:
    load_probe = _benchmark_module("load_probe")
    probe, remaining = _scripted([14.0, 9.0, 12.5, 9.5, 9.6, 99.0])
    fake = _FakeTime()
    gate = load_probe.QuietGate(9.7, 600, probe, interval_s=30, sleep=fake.sleep, clock=fake.clock)
    assert gate.wait() == (True, 9.6)
    assert gate.readings == [14.0, 9.0, 12.5, 9.5, 9.6] and remaining == [99.0]
    assert fake.slept == [30, 30] and gate.waited_s == 60  # it sleeps only after a loaded reading
    assert gate.time_left()


def test_quiet_gate_gives_up_within_its_budget() -> None:
    load_probe = _benchmark_module("load_probe")
    probe, _ = _scripted([], then=12.0)
    fake = _FakeTime()
    gate = load_probe.QuietGate(9.7, 100, probe, interval_s=30, sleep=fake.sleep, clock=fake.clock)
    assert gate.wait() == (False, 12.0)
    assert gate.readings == [12.0] * 4 and fake.now == 90  # read at 0, 30, 60, 90 s; 120 is past the budget


def test_probe_reads_a_positive_time_and_restores_the_thread_count() -> None:
    load_probe = _benchmark_module("load_probe")
    threads = torch.get_num_threads()
    assert load_probe.probe_ms(1, repeats=2, shape=(8, 16, 2048)) > 0
    assert torch.get_num_threads() == threads


_TINY_GRID = ["--classes", "2000", "--batch", "16", "--rates", "0.1", "--modes", "sparse", "--dtypes", "fp32",
              "--steps", "1", "--baseline-steps", "0", "--threads", "1"]  # fmt: skip


def test_benchmark_waits_for_quiet_and_reruns_a_case_that_load_came_into(tmp_path: Path, monkeypatch) -> None:
    bench = _benchmark_module()
    # grid gate: loaded, quiet, quiet; the case: quiet, quiet, run, loaded after; again: quiet x2, run, quiet
    probe, remaining = _scripted([20.0, 5.0, 5.5, 5.0, 5.2, 7.0, 5.1, 5.3, 5.4])
    monkeypatch.setattr(bench, "probe_ms", lambda threads: probe())
    monkeypatch.setattr(bench, "QuietGate", functools.partial(bench.QuietGate, interval_s=0.0))
    runs = []
    real_run_worker = bench.run_worker
    monkeypatch.setattr(bench, "run_worker", lambda *args: runs.append(1) or real_run_worker(*args))
    out = tmp_path / "head_wait"
    bench.main([*_TINY_GRID, "--wait-quiet", "60", "--quiet-below", "6", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    case = next(r for r in report["results"] if r["kind"] == "head")
    assert len(runs) == 2 and not remaining
    assert case["load_probe_ms"] == {"before": 5.3, "after": 5.4, "runs": 2}
    assert report["load_probe"]["readings_ms"] == [20.0, 5.0, 5.5, 5.0, 5.2, 5.1, 5.3]  # the gate's own
    markdown = out.with_suffix(".md").read_text()
    assert "| 5.3 / 5.4 (2 runs) |" in markdown and "two readings in a row <= 6.0 ms" in markdown


def test_a_case_with_load_inside_it_runs_again(monkeypatch) -> None:
    bench = _benchmark_module()
    # quiet readings around both runs, but the first run's floor rounds say load came and went inside it
    results = [{"floor_ms": {"min": 25.3, "med": 29.5}}, {"floor_ms": {"min": 25.0, "med": 27.2}}]
    monkeypatch.setattr(bench, "run_worker", lambda cfg, timeout: dict(results.pop(0)))
    monkeypatch.setattr(bench, "probe_ms", lambda threads: 5.0)
    gate = bench.QuietGate(6.0, 60, lambda: 5.0)
    result = bench.run_worker_probed({}, argparse.Namespace(threads=1, timeout=10.0), gate)
    assert result["floor_ms"] == {"min": 25.0, "med": 27.2}  # the second run's (1.09: quiet enough)
    assert result["load_probe_ms"] == {"before": 5.0, "after": 5.0, "runs": 2}
    assert not results


def test_benchmark_marks_a_case_measured_when_the_wait_ran_out(tmp_path: Path, monkeypatch) -> None:
    bench = _benchmark_module()
    probe, _ = _scripted([5.0, 5.0], then=20.0)  # quiet for the grid's gate, then loaded for good
    fake = _FakeTime()
    monkeypatch.setattr(bench, "probe_ms", lambda threads: probe())
    monkeypatch.setattr(
        bench, "QuietGate", functools.partial(bench.QuietGate, sleep=fake.sleep, clock=fake.clock)
    )
    out = tmp_path / "head_loaded_case"
    bench.main([*_TINY_GRID, "--wait-quiet", "100", "--quiet-below", "6", "--out", str(out)])
    case = next(r for r in json.loads(out.with_suffix(".json").read_text())["results"] if r["kind"] == "head")
    assert case["load_probe_ms"] == {"before": 20.0, "after": 20.0, "runs": 1}  # measured once, not re-run
    assert "| 20.0 / 20.0 † |" in out.with_suffix(".md").read_text()


def test_benchmark_runs_nothing_when_the_machine_stays_loaded(tmp_path: Path, monkeypatch) -> None:
    bench = _benchmark_module()
    fake = _FakeTime()
    monkeypatch.setattr(bench, "probe_ms", lambda threads: 20.0)
    monkeypatch.setattr(
        bench, "QuietGate", functools.partial(bench.QuietGate, sleep=fake.sleep, clock=fake.clock)
    )
    monkeypatch.setattr(bench, "run_worker", lambda *args: pytest.fail("a config ran on a loaded machine"))
    out = tmp_path / "head_loaded"
    with pytest.raises(SystemExit, match=r"stayed loaded for 90 s .* <= 6.0 ms"):
        bench.main([*_TINY_GRID, "--wait-quiet", "100", "--quiet-below", "6", "--out", str(out)])
    assert not out.with_suffix(".json").exists()
    with pytest.raises(SystemExit):  # --wait-quiet without a threshold is a usage error
        bench.main(["--wait-quiet", "100"])


def test_head_parts_benchmark_runs_every_part_tiny(tmp_path: Path) -> None:
    bench = _benchmark_module("head_parts")
    out = tmp_path / "parts"
    bench.main(["--classes", "6000", "--sampled", "2500", "--batch", "8", "--rounds", "1", "--threads", "1",
                "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    parts = [case["part"] for case in report["cases"]]
    assert parts == ["rows", "rows", "sort", "draw", "cosine GEMM", "logits passes", "sort", "draw"]
    assert "native select" in report["cases"][2]["ms"] and report["cases"][-1]["C"] == 60_000
    draws = set(report["cases"][3]["ms"])
    assert draws == {"from a seed (native draw)", "from a generator (uniform_ + select)"}
    passes = report["cases"][5]["ms"]
    assert {"softmax native", "softmax torch ops", "bf16 cosines native"} <= set(passes)
    rows = report["cases"][0]["ms"]
    assert set(rows) == {"update huge", "update 4k", "gather huge", "gather 4k",
                         "gradient block copies (in update)"} and min(rows.values()) > 0
    assert "| cosine GEMM | B 8, C' 2,500 |" in out.with_suffix(".md").read_text()
    forward = report["cases"][4]["ms"]  # the head's form against the others it was chosen over
    assert any(name.startswith("head (") for name in forward) and "one MKL torch.mm, then a pass" in forward
    if gemm.fp32_backend() == "onednn":
        assert {"1024-row blocks", "one product", "1024-row blocks copied, then a pass"} <= set(forward)


def test_plan_skips_what_cannot_fit_and_parses_counts() -> None:
    bench = _benchmark_module()
    assert bench.parse_count("100k") == 100_000 and bench.parse_count("1M") == 1_000_000
    args = bench.argparse.Namespace(
        classes=[10_000_000], batch=[512], rates=[1.0], modes=["dense"], dtypes=["fp32"], threads=1,
        large_from=1_000_000, baseline_steps=1, baseline_steps_large=1, warmup=1, steps=1, steps_large=1,
        max_gib=14.0,
    )  # fmt: skip
    configs = bench.plan(args)
    assert [c["kind"] for c in configs] == ["full_fc", "head"]
    assert all("skipped" in c for c in configs)


def _head(update: str, dtype: torch.dtype, rate: float = 0.3) -> PartialFCHead:
    return PartialFCHead(
        500, 16, build_margin(MarginConfig()), seed=3, sample_rate=rate, update=update, storage_dtype=dtype
    )


@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_center_norms_match_recomputed_ones_after_steps(update: str, dtype: torch.dtype) -> None:
    head = _head(update, dtype)
    head.center_optimizer.block_rows = 64  # several blocks per step
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(8, 16, generator=gen).requires_grad_()
        loss, _ = head(x, torch.randint(0, 500, (8,), generator=gen), step)
        loss.backward()
        head.optimizer_step(0.5)
        cached = head._center_inv_norms()
        torch.testing.assert_close(cached, inverse_row_norms(head.centers, torch.float32), rtol=0, atol=0)
    head.centers.mul_(2.0)  # written outside optimizer_step: the cache must notice
    torch.testing.assert_close(head._center_inv_norms(), inverse_row_norms(head.centers, torch.float32))


def test_head_reports_step_timing_for_the_trainer() -> None:
    head = _head("sparse", torch.float32)
    x = torch.randn(8, 16).requires_grad_()
    loss, _ = head(x, torch.arange(8), 0)
    loss.backward()
    head.optimizer_step(0.1)
    parts = (head.last_forward_ms, head.last_backward_ms, head.last_optimizer_ms)
    assert all(part > 0 for part in parts)
    assert head.last_step_ms == pytest.approx(sum(parts))
