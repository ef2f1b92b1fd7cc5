"""The fused CPU update (heads/native.py) against torch.optim and the torch path; bf16 centers keep updates
smaller than their ulp (fp32 trajectory within 1e-3); plan reports the residual's bytes."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest
import torch

import facescale.heads.center_optimizer as center_optimizer
from facescale.config.schema import HeadConfig, MarginConfig
from facescale.heads import native
from facescale.heads.center_optimizer import RESIDUAL, CenterOptimizer
from facescale.heads.margins import build_margin
from facescale.heads.native import center_kernels
from facescale.heads.partial_fc import PartialFCHead
from facescale.partial_fc.plan import head_shard

needs_kernels = pytest.mark.skipif(center_kernels() is None, reason="no C++ compiler: the fused path is off")
ROWS, DIM = 37, 24


@pytest.fixture(params=["fused", "torch"])
def path(request, monkeypatch) -> str:
    """Run a test on the fused kernels and on the torch path (the one CUDA and AdamW use)."""
    if request.param == "fused" and center_kernels() is None:
        pytest.skip("no C++ compiler: the fused path is off")
    if request.param == "torch":
        monkeypatch.setattr(center_optimizer, "center_kernels", lambda: None)
    return request.param


def _sgd_reference(init: torch.Tensor, grads: list[torch.Tensor], lr: float, momentum: float, wd: float):
    param = torch.nn.Parameter(init.double().clone())
    opt = torch.optim.SGD([param], lr=lr, momentum=momentum, weight_decay=wd)
    for grad in grads:
        param.grad = grad.double()
        opt.step()
    return param.detach()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_bf16_centers_keep_weight_decay_below_their_ulp(mode: str, path: str) -> None:
    """100 steps of decay alone (lr 0.1, wd 5e-4, momentum 0.9): a unit row must shrink like fp32 does
    (to ~0.955), not stay at 1.0 because each step's change is below half a bf16 ulp."""
    init = torch.nn.functional.normalize(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0)))
    centers = init.to(torch.bfloat16)
    opt = CenterOptimizer(ROWS, DIM, mode=mode, momentum=0.9, weight_decay=5e-4, state_dtype=torch.bfloat16)
    index = torch.arange(ROWS)
    zeros = [torch.zeros(ROWS, DIM)] * 100
    for grad in zeros:
        opt.step(centers, grad.to(torch.bfloat16), index, 0.1)
    expected = _sgd_reference(init.to(torch.bfloat16).float(), zeros, 0.1, 0.9, 5e-4)
    value = centers.float() + opt.state_tensors()[RESIDUAL].float()
    norms, expected_norms = value.norm(dim=1), expected.norm(dim=1).float()
    assert float(expected_norms.mean()) == pytest.approx(0.955, abs=0.002)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-3, atol=0)
    # the forward reads hi alone: it is within half a bf16 ulp of the tracked value
    assert float((centers.float() - expected.float()).abs().max()) <= 2**-8


def test_bf16_head_tracks_the_fp32_head_through_small_updates(path: str) -> None:
    """Whole-head training at a small lr: every center update is below a bf16 ulp, yet the bf16 run's
    centers move like the fp32 run's (without the residual they would not move at all)."""
    heads = {
        dtype: PartialFCHead(
            300, 32, build_margin(MarginConfig()), seed=4, sample_rate=0.5, update="sparse",
            storage_dtype=dtype, init_std=1.0,
        )
        for dtype in (torch.float32, torch.bfloat16)
    }  # fmt: skip
    start = {dtype: head.centers.float().clone() for dtype, head in heads.items()}
    gen = torch.Generator().manual_seed(1)
    for step in range(60):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 300, (16,), generator=gen)
        for head in heads.values():  # fp32 embeddings: the GEMMs run in fp32, only storage differs
            loss, _ = head(x.clone().requires_grad_(), y, step)
            loss.backward()
            head.optimizer_step(1e-3)
    moved32 = heads[torch.float32].centers - start[torch.float32]
    low = heads[torch.bfloat16]
    moved16 = (
        low.centers.float() + low.center_optimizer.state_tensors()[RESIDUAL].float() - start[torch.bfloat16]
    )
    assert float(moved32.norm()) > 0.05
    assert float((moved16 - moved32).norm() / moved32.norm()) < 0.05


@needs_kernels
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [DIM, 136])  # 136: whole register-held replay chunks (64 or 128) + a tail
def test_fused_sgd_matches_torch_optim_and_leaves_unsampled_rows_alone(mode, momentum, threads, dim) -> None:
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(ROWS * 40, dim, generator=gen)  # > 64 rows per thread, so the split is exercised
    centers, rows = init.clone(), init.shape[0]
    opt = CenterOptimizer(rows, dim, mode=mode, momentum=momentum, weight_decay=0.01, block_rows=64)
    inv_norms = 1 / init.norm(dim=1)  # rows never written keep theirs
    full_grads, previous = [], torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(4):
            index = torch.randperm(rows, generator=gen)[: rows // 3].sort().values
            grad = torch.randn(len(index), dim, generator=gen)
            before = centers.clone()
            opt.step(centers, grad, index, 0.05, inv_norms)
            full_grads.append(torch.zeros(rows, dim).index_copy_(0, index, grad))
            if mode == "sparse":
                untouched = torch.ones(rows, dtype=torch.bool)
                untouched[index] = False
                assert torch.equal(centers[untouched], before[untouched])
    finally:
        torch.set_num_threads(previous)
    if mode == "dense":
        expected = _sgd_reference(init, full_grads, 0.05, momentum, 0.01).float()
        torch.testing.assert_close(centers, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inv_norms, 1 / centers.double().norm(dim=1).float(), rtol=1e-6, atol=0)


@needs_kernels
# 64 and 136: whole register-held replay chunks (bf16 rows 32/64 floats, fp32 rows 64/128), 136 with a tail.
# bf16 stops at 64: at 136, 23 of 95k values differ by up to 2e-3 between the paths (so before the chunked
# replay): with more elements some bf16 rounding lands near a tie that the paths' summation orders split.
@pytest.mark.parametrize(
    ("dtype", "dim"),
    [(torch.float32, 32), (torch.float32, 136), (torch.bfloat16, 32), (torch.bfloat16, 64)],
)
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_fused_head_step_equals_the_torch_path(dtype, dim, update, monkeypatch) -> None:
    """The same head trained on the fused and on the torch path (projected center gradient formed on
    demand, bf16 residual, cached norms) ends with the same centers and state."""

    def train(fused: bool) -> PartialFCHead:
        monkeypatch.setattr(center_optimizer, "center_kernels", center_kernels if fused else lambda: None)
        margin = build_margin(MarginConfig())
        head = PartialFCHead(700, dim, margin, seed=2, sample_rate=0.2, update=update, storage_dtype=dtype)
        head.center_optimizer.block_rows = 48
        gen = torch.Generator().manual_seed(5)
        for step in range(5):
            x, y = torch.randn(12, dim, generator=gen).to(dtype), torch.randint(0, 700, (12,), generator=gen)
            loss, _ = head(x.requires_grad_(), y, step)
            loss.backward()
            head.optimizer_step(0.5)
        return head

    fused, reference = train(True), train(False)
    tolerance = {"rtol": 1e-4, "atol": 1e-5}  # rounding order differs; 5 steps at lr 0.5 amplify it
    fused_state, reference_state = (h.center_optimizer.state_tensors() for h in (fused, reference))
    if dtype == torch.bfloat16:  # hi + lo is the center; hi alone may round the other way at a tie
        value = {
            h: h.centers.float() + h.center_optimizer.state_tensors()[RESIDUAL].float()
            for h in (fused, reference)
        }
        torch.testing.assert_close(value[fused], value[reference], **tolerance)
        tolerance = {"rtol": 2**-7, "atol": 1e-6}
    torch.testing.assert_close(fused.centers.float(), reference.centers.float(), **tolerance)
    torch.testing.assert_close(
        fused_state["momentum_buffer"].float(), reference_state["momentum_buffer"].float(), **tolerance
    )


def _mixed_values(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values, subnormals (the CPU's bf16 conversion instruction flushes them) and small normal values
    whose bf16 residual is subnormal, a row of each in turn."""
    normal = torch.randn(shape, generator=gen) * 1e-3
    small = torch.randn(shape, generator=gen) * 2.0**-120  # normal; value - bf16(value) ~ 2^-129: subnormal
    # a subnormal's bits: exponent 0, a random nonzero mantissa and a random sign (as fp32 bit patterns)
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    mantissa = torch.randint(1, 2**mantissa_bits, shape, generator=gen) << (23 - mantissa_bits)
    sign = torch.randint(0, 2, shape, generator=gen) << 31
    tiny = (mantissa | sign).to(torch.int64).remainder(2**32).to(torch.uint32).view(torch.float32)
    kind = torch.arange(shape[0]).remainder(3).unsqueeze(1)
    mixed = torch.where(kind == 1, tiny, torch.where(kind == 2, small, normal))
    return mixed.to(dtype)  # tiny: exact in bf16 (the low 16 bits are zero); the others rounded


def _hi_lo(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 value as bf16 hi + bf16 lo, both rounded by torch (to nearest even, subnormals kept)."""
    hi = value.to(torch.bfloat16)
    return hi, (value - hi.float()).to(torch.bfloat16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


@needs_kernels
@pytest.mark.parametrize("with_momentum", [True, False])
# 88: whole 16-lane vectors and a tail, one 64-element replay chunk and a tail (where chunks are 4
# vectors); 96: whole vectors only (the update's single-pass AVX512-BF16 path); 136: one 128-element replay
# chunk (8 vectors, on AVX512-BF16) and a tail
@pytest.mark.parametrize("dim", [88, 96, 136])
def test_bf16_update_and_replay_round_subnormals_like_torch(with_momentum: bool, dim: int) -> None:
    """The fused bf16 update and the deferred replay store hi, lo and momentum rounded exactly as torch rounds
    fp32 to bf16, subnormals included (16-lane paths may use a conversion instruction that flushes them).
    Steps are chosen so that each value is one exact fp32 operation away from the torch reference."""
    gen = torch.Generator().manual_seed(11)
    rows = 12
    kernels = center_kernels()
    grad = _mixed_values((rows, dim), torch.float32, gen)
    centers = torch.zeros(rows, dim, dtype=torch.bfloat16)
    residual = torch.zeros_like(centers)
    momentum = torch.zeros_like(centers) if with_momentum else None
    # lr 1, no decay: m = g, value = 0 - g exactly; all that remains is the rounding into m, hi and lo
    kernels.sgd(centers, grad, torch.arange(rows), residual=residual, momentum=momentum, lr=1.0,
                mu=0.9 if with_momentum else 0.0, wd=0.0, eps=1e-12)  # fmt: skip
    hi, lo = _hi_lo(-grad)
    assert torch.equal(_bits(centers), _bits(hi)) and torch.equal(_bits(residual), _bits(lo))
    if with_momentum:
        assert torch.equal(_bits(momentum), _bits(grad.to(torch.bfloat16)))

    # one missed zero-gradient step at lr 1, wd 0.5, mu 0.5 from a zero momentum: m = value / 2 (one
    # rounding), value - m (one rounding); without momentum value / 2
    centers, residual = (_mixed_values((rows, dim), torch.bfloat16, gen) for _ in range(2))
    value = centers.float() + residual.float()
    momentum = torch.zeros_like(centers) if with_momentum else None
    mu = 0.5 if with_momentum else 0.0
    steps_seen = torch.zeros(rows, dtype=torch.int64)  # brought to step 1, whose lr is lr_history[1 % 1] = 1
    kernels.catch_up(centers, None, steps_seen, 1, torch.ones(1), residual=residual, momentum=momentum,
                     inv_norms=None, mu=mu, wd=0.5, eps=1e-12)  # fmt: skip
    half = value * 0.5
    hi, lo = _hi_lo(value - half if with_momentum else half)
    assert torch.equal(_bits(centers), _bits(hi)) and torch.equal(_bits(residual), _bits(lo))
    if with_momentum:
        assert torch.equal(_bits(momentum), _bits(half.to(torch.bfloat16)))
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (hi.float().abs() < tiny) & (hi != 0)
    residual_only = (hi.float().abs() >= tiny) & (lo.float().abs() < tiny) & (lo != 0)
    assert subnormal.any() and residual_only.any()  # the cases the test is for are there


@needs_kernels
# 37: rows that are not whole 16-byte chunks; 100 (fp32): whole 16-byte chunks, not whole 64-byte lines
@pytest.mark.parametrize("dim", [DIM, 37, 100, 512])
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_rows_copies_the_rows_asked_for(dim: int, threads: int, monkeypatch) -> None:
    """The forward's gather (streaming stores, a line or 16 bytes at a time): rows in any order, repeats
    allowed, fp32 and bf16, also into a buffer that is not 16-byte aligned (the plain-copy path)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(3)
    index = torch.cat([torch.randperm(3000, generator=gen)[:700], torch.tensor([5, 5, 2999])])
    n = len(index)
    for dtype in (torch.float32, torch.bfloat16):
        source = torch.randn(3000, dim, generator=gen).to(dtype)
        expected = source.index_select(0, index)
        aligned = torch.full((n, dim), float("nan"), dtype=dtype)
        offset = torch.full((n * dim + 1,), float("nan"), dtype=dtype)[1:].view(n, dim)
        for out in (aligned, offset):
            assert torch.equal(center_kernels().gather_rows(source, index, out), expected)


def test_old_bf16_checkpoints_load_with_a_zero_residual() -> None:
    opt = CenterOptimizer(ROWS, DIM, state_dtype=torch.bfloat16)
    opt.state_tensors()[RESIDUAL].fill_(1.0)
    opt.load_state_tensors({"momentum_buffer": torch.ones(ROWS, DIM)})
    assert float(opt.state_tensors()[RESIDUAL].abs().max()) == 0.0
    opt.load_state_tensors({})  # saved at head.momentum 0: the momentum starts at zero (README, resume)
    assert float(opt.state_tensors()["momentum_buffer"].abs().max()) == 0.0
    moments = {"exp_avg": torch.ones(ROWS, DIM), "exp_avg_sq": torch.ones(ROWS, DIM)}
    with pytest.raises(ValueError, match="head.optimizer"):  # AdamW's state into SGD: another optimizer
        opt.load_state_tensors(moments)


def test_plan_reports_the_bf16_residual() -> None:
    rows = 1000
    bf16 = head_shard(HeadConfig(storage_dtype="bf16"), rows, 64, 1, 0)
    fp32 = head_shard(HeadConfig(storage_dtype="fp32"), rows, 64, 1, 0)
    assert bf16.residual_bytes == rows * 64 * 2 and fp32.residual_bytes == 0
    assert bf16.optimizer_bytes == 2 * rows * 64 * 2  # momentum + residual


@needs_kernels
def test_the_built_kernels_prefetch_their_scattered_rows() -> None:
    """The update, the catch-up (and its replay) and the gather walk scattered rows and ask for the next ones
    ahead; a compiler may silently drop prefetches (GCC deleted calls to a helper made only of them): read the
    code."""
    opcode = {"x86_64": r"\tprefetch", "aarch64": r"\tprfm"}.get(platform.machine())
    if opcode is None or shutil.which("objdump") is None:
        pytest.skip("needs objdump and an x86-64 or arm64 machine to read the kernels' instructions")
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(center_kernels().path)],
        check=True, capture_output=True, text=True,
    ).stdout
    functions = re.split(r"\n(?=[0-9a-f]+ <)", listing)
    # the sparse update prefetches from its row loop (run_range) or the row's own loop (update_row...)
    for callers in (("run_range", "update_row"), ("facescale_center_catch_up",), ("facescale_gather_rows",)):
        bodies = [f for f in functions if any(c in f.split("\n", 1)[0] for c in callers)]
        assert bodies, f"no function named like {callers} in the kernels' library"
        assert any(re.search(opcode, body) for body in bodies), f"{callers} issue no prefetch"
    # the catch-up's replay fetches the row after next a line per chunk (where GCC keeps it out of line)
    replays = [f for f in functions if "replay_row" in f.split("\n", 1)[0]]
    assert not replays or any(re.search(opcode, body) for body in replays), "the replay issues no prefetch"


@needs_kernels
def test_the_kernels_hot_loops_compile_to_simd(tmp_path) -> None:
    """Every loop marked `// simd` in the kernels' sources is vectorised (`// simd without AVX512-BF16`: on
    CPUs without it), and no explicit vector type is wider than the target's registers (GCC expands those
    element by element), with the library's own flags on this machine: on an AVX2-only CPU a select inside
    exp's loop once left the softmax pass scalar."""
    cxx = native.compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:
        pytest.skip(f"the vectorisation report is read from GCC's -fopt-info; {cxx} is not GCC")
    predefined = native.compile_command(cxx, "-dM", "-E", "-x", "c++", "/dev/null")
    macros = subprocess.run(predefined, check=True, capture_output=True, text=True).stdout
    # loops that AVX512-BF16 builds replace by 16-lane code are checked where that code is not compiled
    portable_only = "__AVX512BF16__" not in macros
    for source in native.SOURCES:
        report = subprocess.run(
            native.compile_command(
                cxx, "-c", str(source), "-o", str(tmp_path / "kernel.o"),
                "-fopt-info-vec-optimized", "-Wvector-operation-performance",
            ),
            check=True, capture_output=True, text=True,
        ).stderr
        expanded = [line for line in report.splitlines() if "-Wvector-operation-performance" in line]
        assert not expanded, f"{source.name}: vector operations expanded piecewise:\n" + "\n".join(expanded)
        pattern = rf"{re.escape(source.name)}:(\d+):\d+: optimized: .*vectorized"
        vectorised = {int(n) for n in re.findall(pattern, report)}
        lines = source.read_text().splitlines()
        marked = [
            n for n, text in enumerate(lines, 1)
            if text.endswith("// simd") or (portable_only and "// simd without AVX512-BF16" in text)
        ]  # fmt: skip
        missed = [n for n in marked if not {n, n + 1} & vectorised]  # GCC names the loop or its 1st statement
        assert not missed, f"{source.name}: loops marked `// simd` left scalar at lines {missed}"
