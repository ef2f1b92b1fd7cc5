"""Cosine logits between embeddings and class centers without materialising normalize(W).

cos = (xn @ W.t()) * r with xn = x/||x|| and r_c = 1/||w_c||. Normalising W explicitly would allocate
C x D temporaries in forward and backward (the dominant cost at a million classes); here the only C-sized
extras are the row-norm vector and the C x D gradient itself:
    dxn = (G*r) @ W,    dW = (G*r).t() @ xn - (r^2 * sum_b G*cos)[:, None] * W
The GEMMs run in the promoted dtype of (x, W) (bf16 x bf16 stays bf16; bf16 W met by fp32 x is widened a block
of rows at a time on the CPU, see cosine_gemm); cosines come out in fp32 (or
float64 for float64 inputs), clamped to [-1, 1]. The clamp is treated as identity in backward: it only
trims rounding excursions and keeps arccos-based margins defined.

With a `CenterGrad` sink, backward does not form dW at all: it keeps G*r and x-hat, and `CenterGrad.rows`
forms any block of dW on demand, so the center optimizer can compute and apply it block by block while the
block is in cache (no C' x D gradient, and for a whole shard no C x D temporary, is ever allocated). Using
sum_b G*cos = r * (w . P) with P = (G*r).t() @ xn, a block is P - r^2 (w . P) w.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from facescale.heads.cpu_threads import all_threads, small_ops_serial
from facescale.heads.gemm import fresh_product, matmul
from facescale.heads.native import center_kernels, native_kernels_for

_NORM_EPS = 1e-12  # like F.normalize: divide by max(||v||, eps)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, otherwise the dtype itself (float64 stays float64 for reference tests)."""
    return torch.promote_types(dtype, torch.float32)


_NORM_BLOCK_ROWS = 4096  # half-precision rows are up-cast a cache-sized block at a time
_GEMM_BLOCK_ROWS = 1024  # fp32 cosine GEMM on the CPU, a block of centers at a time (see cosine_gemm)
_FRESH_BLOCK_BYTES = 2 * 2**20  # oneDNN's fresh forward products: about this size each (see cosine_blocks)


def _row_blocks(
    weight: Tensor, dtype: torch.dtype, rows: int = _GEMM_BLOCK_ROWS
) -> Iterator[tuple[int, int, Tensor]]:
    """(lo, hi, weight[lo:hi] in `dtype`) per block of `rows` rows; rows of another dtype (bf16 centers met by
    fp32 embeddings) are widened into one reused block, never into a C' x D copy."""
    scratch: Tensor | None = None
    for lo in range(0, weight.shape[0], rows):
        hi = min(lo + rows, weight.shape[0])
        block = weight[lo:hi]
        if block.dtype != dtype:
            if scratch is None:
                scratch = torch.empty(min(rows, len(weight)), weight.shape[1], dtype=dtype)
            block = scratch[: hi - lo].copy_(block)
        yield lo, hi, block


def _blocks_on_cpu(x: Tensor, weight: Tensor) -> bool:
    """fp32 products with bf16 rows on the CPU run block by block (see cosine_gemm)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.bfloat16


def cosine_gemm(x_hat: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """x_hat @ weight.t() ([N, D] x [C', D] -> [N, C']) in x_hat's dtype, into `out` if given. fp32 on the
    CPU runs per block of 1024 center rows (heads/gemm.py's product: oneDNN where torch has it): into `out`,
    because MKL's one-call product keeps ~10 MB of workspace beside the [N, C'] output, the blocks ~2 MB, at
    about the same speed (benchmarks/results/head_parts_cpu.md); oneDNN returns each block as a fresh tensor,
    which the head's forward scales into its buffer as it goes (cosine_blocks; a fresh [N, C'] product every
    step, 4.0 against 4.4 ms in blocks at N = 128, C' = 10k, made glibc's heap grow by 140 MB or more before
    it settled); and for bf16 rows (bf16 centers, fp32 embeddings), each block widened on the way (exact), so
    that no C' x D fp32 copy of the rows is made."""
    cpu_fp32 = x_hat.device.type == "cpu" and x_hat.dtype == torch.float32
    with all_threads():
        if _blocks_on_cpu(x_hat, weight) or (cpu_fp32 and out is not None and len(weight) > _GEMM_BLOCK_ROWS):
            out = x_hat.new_empty(x_hat.shape[0], weight.shape[0]) if out is None else out
            for lo, hi, block in _row_blocks(weight, x_hat.dtype):
                matmul(x_hat, block.t(), out=out[:, lo:hi])
            return out
        return matmul(x_hat, weight.to(x_hat.dtype).t(), out)


def _cosine_block_rows(x_hat: Tensor, weight: Tensor) -> int:
    """Center rows per cosine_blocks product: ~2 MiB of product, at least 1024 rows; 1024 for bf16 rows
    (each block is widened into an fp32 copy first)."""
    if weight.dtype != x_hat.dtype:
        return _GEMM_BLOCK_ROWS
    return max(_GEMM_BLOCK_ROWS, _FRESH_BLOCK_BYTES // max(1, x_hat.shape[0] * x_hat.element_size()))


def fresh_cosine_blocks(x_hat: Tensor, weight: Tensor) -> bool:
    """True where cosine_blocks' fp32 products come back from oneDNN as fresh tensors (heads/gemm.py): the
    forward then scales and clamps each on its way into the logits buffer (one pass) instead of copying it
    there and making a pass over the buffer."""
    rows = min(len(weight), _cosine_block_rows(x_hat, weight))  # x_hat.t() below: any fp32 operand
    fp32_blocks = x_hat.dtype == torch.float32 and weight.dtype in (torch.float32, torch.bfloat16)
    return fp32_blocks and rows > 0 and fresh_product(x_hat.shape[0], rows, x_hat, x_hat.t())


def cosine_blocks(x_hat: Tensor, weight: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """(lo, hi, x_hat @ weight[lo:hi].t()) per block of center rows, each product in x_hat's dtype and about
    2 MiB: oneDNN runs [N, D] x [D, k] faster in wider blocks at small N (N = 128: 4096 rows rather than
    1024; N = 64: 8192; N = 512 alike from 1024 to 4096), while a one-call product beyond the heap glibc keeps
    is paged in afresh (N = 512), and one that fits (N = 128, C' = 30k: 15 MB, 10-20% faster) would add
    itself to the step's peak (benchmarks/results/head_parts_forward_cpu.md: the forms side by side)."""
    for lo, hi, block in _row_blocks(weight, x_hat.dtype, _cosine_block_rows(x_hat, weight)):
        with all_threads():
            product = matmul(x_hat, block.t())
        yield lo, hi, product


def fused_cosines(x_hat: Tensor, weight: Tensor, w_inv: Tensor, out: Tensor) -> Tensor | None:
    """clamp((x_hat @ weight.t()) * w_inv, -1, 1) into the fp32 [N, C'] buffer `out`, each of cosine_blocks'
    fresh oneDNN products scaled and clamped on its way in (one native pass per block, no copy); None where
    the products are not fresh or the native kernels do not apply (the caller takes cosine_gemm's path)."""
    kernels = native_kernels_for(x_hat, w_inv, out) if fresh_cosine_blocks(x_hat, weight) else None
    if kernels is None:
        return None
    for lo, hi, product in cosine_blocks(x_hat, weight):
        kernels.scale_clamp_into(product, w_inv[lo:hi], out[:, lo:hi])
    return out


def combine_rows(coeffs: Tensor, weight: Tensor) -> Tensor:
    """coeffs @ weight ([N, C'] x [C', D] -> [N, D]) in coeffs' dtype; bf16 rows with fp32 coeffs on the CPU
    are widened a block at a time and accumulated (no C' x D fp32 copy, as in cosine_gemm)."""
    with all_threads():
        if not _blocks_on_cpu(coeffs, weight):
            return matmul(coeffs, weight.to(coeffs.dtype))
        out = coeffs.new_zeros(coeffs.shape[0], weight.shape[1])
        for lo, hi, block in _row_blocks(weight, coeffs.dtype):
            out.add_(matmul(coeffs[:, lo:hi], block))
        return out


def inverse_row_norms(rows: Tensor, out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """1 / max(||row||, eps) per row, accumulated in at least fp32 without a full-size up-cast copy.

    fp32/bf16 rows on the CPU go through the native kernel, the one the center optimizer refreshes its
    cached norms with, so cached and recomputed norms are bit-identical (an exact resume needs that)."""
    acc_dtype = _accumulate_dtype(out_dtype)
    if out is None:
        out = torch.empty(rows.shape[0], dtype=acc_dtype, device=rows.device)
    kernels = native_kernels_for(rows, out)
    if kernels is not None:
        return kernels.inverse_row_norms(rows, out, _NORM_EPS)
    step = rows.shape[0] if rows.dtype == acc_dtype else _NORM_BLOCK_ROWS
    for lo in range(0, rows.shape[0], max(step, 1)):
        torch.linalg.vector_norm(rows[lo : lo + step], dim=1, dtype=acc_dtype, out=out[lo : lo + step])
    return out.clamp_min_(_NORM_EPS).reciprocal_()


class CenterGrad:
    """d loss / d weight of one `norm_linear` call, kept factored (G*r, x-hat) and formed block by block."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None  # the [C', D] rows the cosines were computed from
        self.w_inv: Tensor | None = None  # [C'] 1/||w||, accumulate dtype
        self.grad_scaled: Tensor | None = None  # [N, C'] G*r in the GEMM dtype; set by backward
        self.x_hat: Tensor | None = None  # [N, D] in the GEMM dtype

    @property
    def ready(self) -> bool:
        """True once backward has run."""
        return self.grad_scaled is not None

    @property
    def num_rows(self) -> int:
        return 0 if self.weight is None else self.weight.shape[0]

    def rows(self, start: int, stop: int, weight: Tensor | None = None) -> Tensor:
        """dW for weight rows [start, stop) in the accumulate dtype: one small [rows, N] x [N, D] GEMM.

        `weight`: those rows already in the accumulate dtype (saves an up-cast copy); default: own copy."""
        if self.grad_scaled is None or self.weight is None or self.w_inv is None or self.x_hat is None:
            raise RuntimeError(
                "no center gradient: call loss.backward() between forward() and optimizer_step()"
            )
        cols = slice(start, stop)
        acc_dtype = self.w_inv.dtype
        weight = self.weight[cols].to(acc_dtype) if weight is None else weight
        w_inv = self.w_inv[cols]
        with all_threads():  # [rows, D] work
            block = matmul(self.grad_scaled[:, cols].t(), self.x_hat).to(acc_dtype)  # P = (G*r).t() @ x-hat
            radial = (block * weight).sum(dim=1).mul_(w_inv).mul_(w_inv)  # r^2 (w . P) = r^2 sum_b G*cos
            return block.addcmul_(weight, radial[:, None], value=-1.0)

    def full(self) -> Tensor:
        """The whole [C', D] gradient (for callers that need it materialised, e.g. grad accumulation)."""
        return self.rows(0, self.num_rows)


class _NormLinear(torch.autograd.Function):
    """Autograd Function behind `norm_linear`; saves x-hat, W, r (and the cosines when it forms dW itself)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        sink: CenterGrad | None,
        w_inv: Tensor | None,
        out_holder: tuple[Tensor | None],
    ) -> Tensor:
        gemm_dtype = torch.promote_types(x.dtype, weight.dtype)
        acc_dtype = _accumulate_dtype(gemm_dtype)
        x_inv = inverse_row_norms(x, acc_dtype)
        x_hat = (x.to(acc_dtype) * x_inv[:, None]).to(gemm_dtype)
        w_inv = inverse_row_norms(weight, acc_dtype) if w_inv is None else w_inv.to(acc_dtype)
        (out,) = out_holder  # in a tuple so autograd does not treat the returned buffer as a view of an input
        reuse = out is not None and out.dtype == acc_dtype and out.shape == (x.shape[0], weight.shape[0])
        clamped = False  # the native passes scale and clamp in one go
        fused = fused_cosines(x_hat, weight, w_inv, out) if reuse else None
        if fused is not None:  # each fresh block scaled and clamped into the buffer
            cos, clamped = fused, True
        elif gemm_dtype == acc_dtype:  # fp32 GEMMs, also for bf16 centers met by fp32 embeddings
            cos = cosine_gemm(x_hat, weight, out if reuse else None)
            kernels = native_kernels_for(cos, w_inv)
            if kernels is not None:
                cos, clamped = kernels.scale_clamp_(cos, w_inv), True
            else:
                cos.mul_(w_inv[None, :])
        elif reuse and native_kernels_for(x_hat, weight.detach(), w_inv, out) is not None:  # GEMM inside out
            cos = center_kernels().bf16_cosines_in_place(x_hat, weight.detach(), w_inv, out)
            clamped = True
        else:  # one pass: up-cast and scale together
            with all_threads():
                raw = x_hat @ weight.to(gemm_dtype).t()
            cos = torch.mul(raw, w_inv[None, :], out=out) if reuse else torch.mul(raw, w_inv[None, :])
            del raw
        if not clamped:
            cos.clamp_(-1.0, 1.0)
        ctx.grad_in_place = reuse
        # without a sink, backward needs the cosines; a caller's buffer may be overwritten after forward
        # (the head turns it into exponentials in place), so then they are recomputed instead of saved
        ctx.save_for_backward(x_hat, x_inv, weight, w_inv, None if sink is not None or reuse else cos)
        ctx.x_dtype, ctx.sink = x.dtype, sink
        if sink is not None:
            sink.weight, sink.w_inv = weight.detach(), w_inv
        return cos

    @staticmethod
    def backward(ctx: Any, grad_cos: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        if not ctx.grad_in_place:  # not the head's buffer chain: leave torch's threading alone
            return _NormLinear._backward(ctx, grad_cos)
        with small_ops_serial(grad_cos.device):  # small ops on this thread, GEMMs on all (cpu_threads.py)
            return _NormLinear._backward(ctx, grad_cos)

    @staticmethod
    def _backward(ctx: Any, grad_cos: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x_hat, x_inv, weight, w_inv, cos = ctx.saved_tensors
        gemm_dtype = x_hat.dtype
        acc_dtype = w_inv.dtype
        grad_x = grad_w = None
        half_in_place = ctx.grad_in_place and ctx.sink is not None and gemm_dtype == torch.bfloat16
        if ctx.grad_in_place and grad_cos.dtype == gemm_dtype and grad_cos.is_contiguous():
            with all_threads():  # G * r in the caller's buffer (see norm_linear)
                grad_scaled = grad_cos.mul_(w_inv[None, :])
        elif (
            half_in_place and native_kernels_for(grad_cos, w_inv) is not None
        ):  # G * r as bf16 in that buffer
            grad_scaled = center_kernels().scaled_bf16_in_place(grad_cos, w_inv)
        else:
            grad_scaled = torch.empty(grad_cos.shape, dtype=gemm_dtype, device=grad_cos.device)
            with all_threads():
                torch.mul(grad_cos, w_inv[None, :], out=grad_scaled)  # G * r, N x C', in the GEMM dtype
        if ctx.needs_input_grad[0]:
            grad_x_hat = combine_rows(grad_scaled, weight).to(acc_dtype)
            x_hat_acc = x_hat.to(acc_dtype)
            radial = (grad_x_hat * x_hat_acc).sum(dim=1, keepdim=True)
            grad_x = ((grad_x_hat - radial * x_hat_acc) * x_inv[:, None]).to(ctx.x_dtype)
        if ctx.sink is not None:
            ctx.sink.grad_scaled, ctx.sink.x_hat = grad_scaled, x_hat
        elif ctx.needs_input_grad[1]:
            with all_threads():  # [N, C'] and [C', D] work
                if cos is None:  # forward wrote the cosines to the caller's buffer: recompute them
                    cos = cosine_gemm(x_hat, weight).to(acc_dtype).mul_(w_inv[None, :]).clamp_(-1.0, 1.0)
                grad_w = matmul(grad_scaled.t(), x_hat).to(acc_dtype)
                # r^2 sum_b G*cos, from G*r when G itself was overwritten in place
                radial_w = (grad_scaled.to(acc_dtype) * cos).sum(dim=0).mul_(w_inv)
                grad_w.addcmul_(weight, radial_w[:, None], value=-1.0)
        return grad_x, grad_w, None, None, None


def norm_linear(
    x: Tensor,
    weight: Tensor,
    center_grad: CenterGrad | None = None,
    weight_inv_norms: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Cosine similarity matrix [N, C'] between rows of x [N, D] and rows of weight [C', D], in fp32+.

    With `center_grad`, backward leaves weight.grad unset and fills `center_grad` instead (see module doc).
    `weight_inv_norms` ([C'], accumulate dtype, no grad): 1/||w|| when the caller keeps them up to date.
    `out` ([N, C'], accumulate dtype): a reused buffer for the cosines, which the caller may overwrite after
    forward; passing it also lets backward overwrite the incoming gradient with G*r in place, so only pass
    it when that gradient is yours to consume (the head's chain: cosines -> logits -> exponentials ->
    gradient, all in one buffer). Without `center_grad`, backward then recomputes the cosines for dW.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"norm_linear needs x [N, D] and weight [C, D]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    return _NormLinear.apply(x, weight, center_grad, weight_inv_norms, (out,))
