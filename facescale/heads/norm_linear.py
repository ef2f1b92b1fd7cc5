"""Cosine logits between embeddings and class centers without materialising normalize(W).

cos = (xn @ W.t()) * r with xn = x/||x|| and r_c = 1/||w_c||. Normalising W explicitly would allocate
C x D temporaries in forward and backward (the dominant cost at a million classes); here the only C-sized
extras are the row-norm vector and the C x D gradient itself:
    dxn = (G*r) @ W,    dW = (G*r).t() @ xn - (r^2 * sum_b G*cos)[:, None] * W
The GEMMs run in the promoted dtype of (x, W) (bf16 x bf16 stays bf16); cosines come out in fp32 (or
float64 for float64 inputs), clamped to [-1, 1]. The clamp is treated as identity in backward: it only
trims rounding excursions and keeps arccos-based margins defined.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_NORM_EPS = 1e-12  # like F.normalize: divide by max(||v||, eps)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, otherwise the dtype itself (float64 stays float64 for reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def inverse_row_norms(rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """1 / max(||row||, eps) per row, accumulated in at least fp32 without copying `rows`."""
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=_accumulate_dtype(out_dtype))
    return norms.clamp_min_(_NORM_EPS).reciprocal_()


class _NormLinear(torch.autograd.Function):
    """Autograd Function behind `norm_linear`; saves x-hat, W, r and the cosines."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        gemm_dtype = torch.promote_types(x.dtype, weight.dtype)
        acc_dtype = _accumulate_dtype(gemm_dtype)
        x_inv = inverse_row_norms(x, acc_dtype)
        x_hat = (x.to(acc_dtype) * x_inv[:, None]).to(gemm_dtype)
        w_inv = inverse_row_norms(weight, acc_dtype)
        cos = (x_hat @ weight.to(gemm_dtype).t()).to(acc_dtype)
        cos.mul_(w_inv[None, :]).clamp_(-1.0, 1.0)
        ctx.save_for_backward(x_hat, x_inv, weight, w_inv, cos)
        ctx.x_dtype = x.dtype
        return cos

    @staticmethod
    def backward(ctx: Any, grad_cos: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_hat, x_inv, weight, w_inv, cos = ctx.saved_tensors
        gemm_dtype = x_hat.dtype
        acc_dtype = cos.dtype
        grad_cos = grad_cos.to(acc_dtype)
        grad_x = grad_w = None
        grad_scaled = grad_cos * w_inv[None, :]  # G * r, N x C'
        if ctx.needs_input_grad[0]:
            grad_x_hat = (grad_scaled.to(gemm_dtype) @ weight.to(gemm_dtype)).to(acc_dtype)
            x_hat_acc = x_hat.to(acc_dtype)
            radial = (grad_x_hat * x_hat_acc).sum(dim=1, keepdim=True)
            grad_x = ((grad_x_hat - radial * x_hat_acc) * x_inv[:, None]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_scaled.to(gemm_dtype).t() @ x_hat).to(acc_dtype)
            radial_w = (grad_cos * cos).sum(dim=0).mul_(w_inv).mul_(w_inv)  # r^2 * sum_b G*cos
            grad_w.addcmul_(weight, radial_w[:, None], value=-1.0)
        return grad_x, grad_w


def norm_linear(x: Tensor, weight: Tensor) -> Tensor:
    """Cosine similarity matrix [N, C'] between rows of x [N, D] and rows of weight [C', D], in fp32+."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"norm_linear needs x [N, D] and weight [C, D]; got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    return _NormLinear.apply(x, weight)
