"""The fused CPU kernels of the head (kernels/: the center optimizer's center_sgd.cpp, the logits buffer's
logit_passes.cpp, the sampler's top_k.cpp), built once per machine into one library, loaded via ctypes.

The sources have a plain C ABI and no torch headers, so they compile with the system C++ compiler in a few
seconds (a torch.utils.cpp_extension build takes minutes on a 2-core CI machine). The library is cached under
$FACESCALE_CACHE/kernels (default ~/.cache/facescale/kernels), keyed by source, compiler and CPU flags, so
a cache shared by different nodes never loads a binary built for another CPU. Without a compiler, or with
FACESCALE_NATIVE_KERNELS=0, `center_kernels()` returns None and callers use their torch path, which has the
same semantics (tests/test_center_kernels.py checks the two against each other). A call splits its work over
the caller and a team of worker threads kept across calls (kernels/common.h: a thread started per call
cost more than a B = 128 pass).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from facescale.heads.cpu_threads import all_threads, thread_budget

_KERNELS = Path(__file__).with_name("kernels")
SOURCES = (_KERNELS / "center_sgd.cpp", _KERNELS / "logit_passes.cpp", _KERNELS / "top_k.cpp")
_HEADERS = (_KERNELS / "common.h",)
# -ffp-contract=off: no multiply-add is fused unless the source says so (std::fma), so code inlined or
# vectorised differently computes the same bits (the deferred dense replay relies on it: center_sgd.cpp).
# -fno-trapping-math: FP exception flags are not observable, so GCC may if-convert a loop's selects (clamps,
# exp's range checks) into blends; without it, on AVX2, it left those loops scalar (exp 6x slower). Same
# values either way. tests/test_center_kernels.py checks that the loops marked `// simd` are vectorised.
_FLAGS = [
    "-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-std=c++17", "-fPIC", "-pthread",
]  # fmt: skip
# GCC's tuning for Intel's AVX-512 CPUs (-march=native: rocketlake, icelake, sapphirerapids...) vectorises
# loops 256 bits wide, so the kernels' `// simd` loops ran at half the CPU's width (the head's bf16 step at
# B = 512 took 1/0.87 as long: benchmarks/results/head_kernels_wide_ab.md); the same bits either way. Without
# AVX-512 it changes nothing.
if os.uname().machine in ("x86_64", "i686"):
    _FLAGS.append("-mprefer-vector-width=512")
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def _cpu_signature() -> str:
    """Model and feature flags of this CPU (-march=native output is only valid on the same kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return os.uname().machine + "\n".join(sorted(set(keep)))


def compiler() -> str | None:
    """The C++ compiler the kernels are built with ($CXX, else c++, g++ or clang++ on PATH)."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def compile_command(cxx: str, *arguments: str) -> list[str]:
    """The compiler invocation with the library's flags (the build adds -shared, sources and -o; tests ask
    the compiler for its vectorisation report with the same flags)."""
    return [cxx, *_FLAGS, *arguments]


def _build(cxx: str) -> Path:
    source = b"".join(path.read_bytes() for path in (*SOURCES, *_HEADERS))
    key = hashlib.sha256(source + cxx.encode() + " ".join(_FLAGS).encode() + _cpu_signature().encode())
    cache = Path(os.environ.get("FACESCALE_CACHE") or Path.home() / ".cache" / "facescale") / "kernels"
    target = cache / f"center_sgd_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then an atomic rename (ranks race)
        built = Path(tmp) / target.name
        command = compile_command(cxx, "-shared", *map(str, SOURCES), "-o", str(built))
        subprocess.run(command, check=True, capture_output=True)
        os.replace(built, target)
    return target


class CenterKernels:
    """ctypes bindings of the kernels; arguments are checked by their callers (center_optimizer.py, ...)."""

    def __init__(self, library: ctypes.CDLL, path: Path | None = None) -> None:
        self.path = path  # the built shared library (tests inspect its machine code)
        self._sgd = library.facescale_center_sgd
        self._sgd.restype = ctypes.c_int
        self._sgd.argtypes = [_I64, _I64, _P, _I64, _P, _I32, _P, _I64, _I64, _P, _I32, _P, _P, _I32, _P]
        self._sgd.argtypes += [_F32, _F32, _F32, _F32, _I32]
        self._inv_norms = library.facescale_inv_norms
        self._inv_norms.restype = ctypes.c_int
        self._inv_norms.argtypes = [_P, _I32, _I64, _I64, _P, _F32, _I32]
        self._to_f32 = library.facescale_bf16_cosines_to_f32
        self._to_bf16 = library.facescale_f32_scaled_to_bf16
        self._scale_clamp = library.facescale_scale_clamp
        self._scale_clamp.argtypes = [_P, _I64, _P, _I64, _I64, _I64, _P, _I32]
        self._row_max = library.facescale_scale_row_max
        self._row_max.argtypes = [_P, _I64, _I64, _F32, _P, _P, _I32]
        self._exp_sums = library.facescale_exp_row_sums
        self._exp_sums.argtypes = [_P, _I64, _I64, _P, _P, _I32]
        for function in (self._to_f32, self._to_bf16):
            function.argtypes = [_P, _P, _I64, _I64, _P, _I32]
        for function in (self._to_f32, self._to_bf16, self._scale_clamp, self._row_max, self._exp_sums):
            function.restype = ctypes.c_int
        self._catch_up = library.facescale_center_catch_up
        self._catch_up.restype = ctypes.c_int
        self._catch_up.argtypes = [_I64, _I64, _P, _P, _I64, _P, _I64, _P, _I32, _P, _P, _P]
        self._catch_up.argtypes += [_F32, _F32, _F32, _P, _I32]
        self._top_k = library.facescale_top_k_sorted
        self._top_k.restype = ctypes.c_int
        self._top_k.argtypes = [_P, _I64, _I64, _P]
        self._draw = library.facescale_draw_top_k
        self._draw.restype = ctypes.c_int
        self._draw.argtypes = [ctypes.c_uint64, _I64, _P, _I64, _I64, _P]
        self._gather = library.facescale_gather_rows
        self._gather.restype = ctypes.c_int
        self._gather.argtypes = [_P, _P, _I64, _I64, _P, _I32]

    def sgd(
        self,
        centers: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        *,
        row_base: int = 0,
        dense_rows: tuple[int, int] = (0, 0),
        proj_inv: Tensor | None = None,
        residual: Tensor | None = None,
        momentum: Tensor | None = None,
        inv_norms: Tensor | None = None,
        lr: float,
        mu: float,
        wd: float,
        eps: float,
    ) -> None:
        """One fused update (see the .cpp header); every tensor contiguous on the CPU."""
        status = self._sgd(
            centers.shape[1],
            grad.shape[0],
            _ptr(rows),
            row_base,
            grad.data_ptr(),
            int(grad.dtype == torch.bfloat16),
            _ptr(proj_inv),
            dense_rows[0],
            dense_rows[1],
            centers.data_ptr(),
            int(centers.dtype == torch.bfloat16),
            _ptr(residual),
            _ptr(momentum),
            int(momentum is not None and momentum.dtype == torch.bfloat16),
            _ptr(inv_norms),
            lr,
            mu,
            wd,
            eps,
            thread_budget(),
        )
        if status:
            raise RuntimeError(
                f"center SGD kernel refused dim {centers.shape[1]} / centers {centers.dtype} with momentum "
                f"{None if momentum is None else momentum.dtype} and residual {residual is not None}"
            )

    def catch_up(
        self,
        centers: Tensor,
        rows: Tensor | None,
        row_steps: Tensor,
        applied: int,
        lr_history: Tensor,
        *,
        residual: Tensor | None,
        momentum: Tensor | None,
        inv_norms: Tensor | None,
        mu: float,
        wd: float,
        eps: float,
        out: Tensor | None = None,
    ) -> None:
        """Replay the zero-gradient steps rows `rows` (None = all) missed, up to `applied` (see the .cpp);
        `out`, if given, receives the rows' current values in `rows` order."""
        status = self._catch_up(
            centers.shape[1],
            centers.shape[0] if rows is None else rows.numel(),
            _ptr(rows),
            row_steps.data_ptr(),
            applied,
            lr_history.data_ptr(),
            lr_history.numel(),
            centers.data_ptr(),
            int(centers.dtype == torch.bfloat16),
            _ptr(residual),
            _ptr(momentum),
            _ptr(inv_norms),
            mu,
            wd,
            eps,
            _ptr(out),
            thread_budget(),
        )
        if status:
            raise RuntimeError(f"center catch-up kernel refused dim {centers.shape[1]} / {centers.dtype}")

    def inverse_row_norms(self, rows: Tensor, out: Tensor, eps: float) -> Tensor:
        """out[i] = 1 / max(||rows[i]||, eps) in fp32, summed in the same order as the update kernel."""
        self._inv_norms(
            rows.data_ptr(),
            int(rows.dtype == torch.bfloat16),
            rows.shape[0],
            rows.shape[1],
            out.data_ptr(),
            eps,
            thread_budget(),
        )
        return out

    def bf16_cosines_in_place(self, x_hat: Tensor, weight: Tensor, scale: Tensor, out: Tensor) -> Tensor:
        """out = clamp((x_hat @ weight.t()) * scale, -1, 1) in fp32 for bf16 x_hat/weight: the bf16 GEMM
        writes into the upper half of `out`'s bytes and one pass widens, scales and clamps it (no [N, C'] bf16
        tensor; in waves that keep each write off unread input, so all threads take part)."""
        rows, cols = out.shape
        raw = out.view(-1).view(torch.bfloat16)[rows * cols :].view(rows, cols)
        with all_threads():
            torch.mm(x_hat, weight.t(), out=raw)
        self._to_f32(raw.data_ptr(), scale.data_ptr(), rows, cols, out.data_ptr(), thread_budget())
        return out

    def scale_clamp_(self, cos: Tensor, scale: Tensor) -> Tensor:
        """cos = clamp(cos * scale[None, :], -1, 1) in one pass (fp32 [N, C'], fp32 [C'])."""
        return self.scale_clamp_into(cos, scale, cos)

    def scale_clamp_into(self, product: Tensor, scale: Tensor, out: Tensor) -> Tensor:
        """out = clamp(product * scale[None, :], -1, 1) in one pass: fp32 [N, k] product and out (out may be a
        block of columns of a wider buffer, or product itself), contiguous fp32 [k] scale."""
        rows, cols = product.shape
        scale = scale.contiguous()
        fp32 = all(t.dtype == torch.float32 for t in (product, scale, out))
        row_major = product.stride(1) == 1 and out.stride(1) == 1
        if not fp32 or not row_major or out.shape != product.shape or scale.numel() != cols:
            raise ValueError(
                f"scale_clamp_into needs [N, k] row-major fp32 blocks and a [k] scale; got "
                f"{tuple(product.shape)}, {tuple(scale.shape)} -> {tuple(out.shape)} "
                f"(strides {product.stride()}, {out.stride()}; "
                f"dtypes {product.dtype}, {scale.dtype}, {out.dtype})"
            )
        self._scale_clamp(
            product.data_ptr(), product.stride(0), out.data_ptr(), out.stride(0), rows, cols,
            scale.data_ptr(), thread_budget(),
        )
        return out

    def scale_row_max_(self, x: Tensor, scale: float, skip_col: Tensor, out: Tensor) -> Tensor:
        """x *= scale, and out[r] = the max of row r without column skip_col[r] (< 0: whole row), in one pass;
        -inf for a row with nothing left, NaN for a row holding a NaN."""
        rows, cols = x.shape
        self._row_max(x.data_ptr(), rows, cols, scale, skip_col.data_ptr(), out.data_ptr(),
                      thread_budget())
        return out

    def exp_row_sums_(self, x: Tensor, shift: Tensor, out: Tensor) -> Tensor:
        """x = exp(x - shift[:, None]) and out = its row sums, in one pass (fp32; exp within ~1 ulp)."""
        rows, cols = x.shape
        self._exp_sums(x.data_ptr(), rows, cols, shift.data_ptr(), out.data_ptr(), thread_budget())
        return out

    def scaled_bf16_in_place(self, grad: Tensor, scale: Tensor) -> Tensor:
        """grad * scale rounded to bf16, written over the lower half of fp32 `grad`'s bytes (grad is
        consumed); returns that [N, C'] bf16 view."""
        rows, cols = grad.shape
        half = grad.view(-1).view(torch.bfloat16)[: rows * cols].view(rows, cols)
        self._to_bf16(grad.data_ptr(), scale.data_ptr(), rows, cols, half.data_ptr(), thread_budget())
        return half

    def top_k_sorted(self, scores: Tensor, k: int) -> Tensor:
        """Ids of the k largest of the non-negative fp32 `scores`, ascending (ties: lowest ids first)."""
        out = torch.empty(max(0, min(k, scores.numel())), dtype=torch.int64)
        if self._top_k(scores.data_ptr(), scores.numel(), k, out.data_ptr()):
            raise ValueError("top_k_sorted needs non-negative, non-NaN scores")
        return out

    def draw_top_k(self, seed: int, count: int, positives: Tensor, k: int) -> Tensor:
        """Ids of the k highest of the scores torch.rand(count) draws from a CPU generator seeded with `seed`,
        the scores of `positives` (int64 ids in [0, count]; count: a spare slot, ignored) raised above them
        all, ascending (ties: lowest ids first): uniform_, index_fill_ and top_k_sorted in one call."""
        positives = positives.contiguous()
        out = torch.empty(max(0, min(k, count)), dtype=torch.int64)
        if self._draw(seed, count, positives.data_ptr(), positives.numel(), k, out.data_ptr()):
            raise ValueError(f"draw_top_k needs positive ids in [0, {count}]")
        return out

    def gather_rows(self, source: Tensor, index: Tensor, out: Tensor) -> Tensor:
        """out[k] = source[index[k]] (contiguous rows, same dtype)."""
        row_bytes = source.shape[1] * source.element_size()
        self._gather(
            source.data_ptr(),
            index.data_ptr(),
            index.numel(),
            row_bytes,
            out.data_ptr(),
            thread_budget(),
        )
        return out


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@lru_cache(maxsize=1)
def center_kernels() -> CenterKernels | None:
    """The loaded kernels, or None (no compiler, build failure, or FACESCALE_NATIVE_KERNELS=0)."""
    if os.environ.get("FACESCALE_NATIVE_KERNELS", "1") == "0":
        return None
    cxx = compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found: the center optimizer uses its slower torch path", stacklevel=2)
        return None
    try:
        built = _build(cxx)
        return CenterKernels(ctypes.CDLL(str(built)), built)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(
            f"building the center optimizer kernels failed ({error}; {detail.decode()[-300:]}): "
            "using the slower torch path",
            stacklevel=2,
        )
        return None


def native_kernels_for(*tensors: Tensor) -> CenterKernels | None:
    """The kernels if every tensor is a contiguous fp32/bf16 CPU tensor and no autograd graph is being
    recorded through them (inside an autograd Function or under no_grad is fine), else None."""
    recording = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.bfloat16):
            return None
        if not tensor.is_contiguous() or (recording and tensor.requires_grad):
            return None
    return center_kernels()
