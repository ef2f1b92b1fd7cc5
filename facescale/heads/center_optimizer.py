"""SGD / AdamW for one rank's shard of class centers, with dense or sparse (sampled-rows-only) updates.

Semantics of the two modes when Partial FC samples a subset of centers each step:
  dense   every row of the shard is updated every step, as torch.optim would on insightface v2's full-shard
          Parameter: rows that were not sampled have zero gradient but still get "ghost" updates (SGD momentum
          keeps moving them and weight decay shrinks them; AdamW decays them and their moments).
  sparse  only the sampled rows and their optimizer state are read and written (PFC v1 / the paper's
          semantics): an unsampled row and its state stay bit-identical, so it is as if that step never
          happened for it. AdamW keeps a per-row step count so bias correction is per row.
With momentum 0 and weight decay 0, SGD gives identical results in both modes. Storage of centers and
state may be bf16; all update math runs in fp32. A bf16 center cannot take an update smaller than half its
ulp (2^-9 relative: lr*wd = 5e-5 per step is lost entirely), so bf16 storage keeps a bf16 residual per
element (`center_residual`, Kahan-style compensation): the center is hi + lo (~16 significant bits), the
forward uses hi, and 2 bytes per element (half an fp32 master copy) keep the bf16 run on the fp32 one.
Both modes work in blocks of at most `block_rows` rows; the gradient may be a tensor or a `CenterGrad` whose
blocks are formed on demand (one small GEMM per block), so the head never materialises a [rows, D]
gradient. On the CPU, SGD runs each block's update as one fused pass per row (heads/native.py: gradient
projection, momentum, decay, write-back, residual and 1/||w|| in place, several threads); otherwise (CUDA,
AdamW, no compiler) the same rule runs as torch ops on up-cast blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facescale.config.schema import OptimizerKind, UpdateKind, choices
from facescale.heads.cpu_threads import all_threads, small_ops_serial
from facescale.heads.deferred_dense import DeferredDense
from facescale.heads.gemm import fresh_product, matmul
from facescale.heads.huge_pages import zeros_rows
from facescale.heads.native import CenterKernels, center_kernels
from facescale.heads.norm_linear import CenterGrad, inverse_row_norms

OPTIMIZERS = choices(OptimizerKind)
UPDATE_MODES = choices(UpdateKind)
RESIDUAL = "center_residual"  # the low part of half-precision centers (see module docstring)
MOMENTUM = "momentum_buffer"  # SGD's, kept only when head.momentum > 0
_HALF = (torch.bfloat16, torch.float16)
_NORM_EPS = 1e-12  # as inverse_row_norms
_CPU_BLOCK_ROWS, _BF16_BLOCK_ROWS = 2048, 10240  # rows per block on the CPU (see _rows_per_block)
_FP32_FACTOR_BYTES = 2 * 2**20  # fp32 CenterGrad blocks: at most ~2 MiB of G*r each (see _rows_per_block)
_MIN_BLOCK_ROWS = 256  # a floor at very large batches, so each call has rows to amortise it (not measured)


def _upcast(t: Tensor) -> Tensor:
    """t in at least fp32: itself when already fp32/fp64 (updates hit storage), else an fp32 working copy."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _grad_rows(grad: Tensor | CenterGrad, start: int, stop: int, weight: Tensor | None = None) -> Tensor:
    """Rows [start, stop) of a gradient given as a tensor or formed on demand from a CenterGrad
    (`weight`: those rows' current values in fp32, when the caller already has them)."""
    return grad[start:stop] if isinstance(grad, Tensor) else grad.rows(start, stop, weight)


class CenterOptimizer(torch.nn.Module):
    """Optimizer state (as buffers, so `.to(device)` moves it) and the update rule for a [rows, D] shard."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        kind: str = "sgd",
        mode: str = "dense",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        block_rows: int | None = None,
        defer_dense: bool = False,
    ) -> None:
        super().__init__()
        if kind not in OPTIMIZERS:
            raise ValueError(f"head.optimizer = {kind!r}: choose one of {', '.join(OPTIMIZERS)}")
        if mode not in UPDATE_MODES:
            raise ValueError(f"head.update = {mode!r}: choose one of {', '.join(UPDATE_MODES)}")
        device_type = torch.device(device or "cpu").type
        if block_rows is None and device_type == "cuda":  # on a GPU, few launches matter more
            block_rows = 65536
        # None (the CPU's default): cache-sized blocks by the dtype of the work, see `_rows_per_block`
        self.kind, self.mode, self.block_rows = kind, mode, block_rows
        self.momentum, self.weight_decay, self.betas, self.eps = momentum, weight_decay, betas, eps
        shape = (num_rows, dim)
        if kind == "sgd" and momentum > 0:
            self.register_buffer(MOMENTUM, zeros_rows(shape, state_dtype, device), False)
        if kind == "adamw":
            self.register_buffer("exp_avg", zeros_rows(shape, state_dtype, device), False)
            self.register_buffer("exp_avg_sq", zeros_rows(shape, state_dtype, device), False)
            self.register_buffer("row_steps", torch.zeros(num_rows, dtype=torch.int64, device=device), False)
        if state_dtype in _HALF:  # centers are stored in the state dtype (PartialFCHead)
            self.register_buffer(RESIDUAL, zeros_rows(shape, state_dtype, device), False)
        self._product: Tensor | None = None  # reused [rows, D] buffer for one block's CenterGrad product
        # `defer_dense`: dense SGD on the CPU kernels defers the unsampled rows' steps (deferred_dense.py),
        # for a caller that reads the centers only after `materialize()` (the head's `centers` does)
        # the kernels that defer are CPU ones
        deferrable = defer_dense and device_type == "cpu" and kind == "sgd" and mode == "dense"
        self.deferred = DeferredDense(num_rows) if deferrable else None

    def state_tensors(self) -> dict[str, Tensor]:
        """Row-aligned state ([rows, ...] each), for checkpoints; resharding is row slicing. Deferred dense
        steps are applied first (centers included), so what is returned is the every-step state."""
        self.materialize()
        return self._state()

    def _state(self) -> dict[str, Tensor]:
        return dict(self.named_buffers())

    def materialize(self) -> None:
        """Apply every deferred dense step now (see heads/deferred_dense.py); a no-op when none is pending."""
        if self.deferred is not None:
            self.deferred.catch_up(None)

    def gather_current(self, index: Tensor, out: Tensor) -> Tensor | None:
        """centers[index] into `out` after replaying the steps those rows missed (their cached norms too);
        None when no step is deferred (the caller gathers as usual)."""
        if self.deferred is None or not self.deferred.lagging:
            return None
        self.deferred.catch_up(index.to(torch.int64).contiguous(), out=out)
        return out

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """Copy saved state into the buffers (shapes must match; dtype/device are converted). A buffer this
        optimizer keeps but the state lacks starts at zero: the residual of a checkpoint written before bf16
        centers had one, or the momentum of one saved at head.momentum 0 (SGD's first step then sets it to
        the gradient, as torch's does); saved momentum is dropped at head.momentum 0."""
        expected = self._state()
        if self.deferred is not None:
            self.deferred.reset()  # the loaded rows are all current
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        if not missing <= {RESIDUAL, MOMENTUM} or not extra <= {MOMENTUM}:
            raise ValueError(
                f"center optimizer state has keys {sorted(state)}, expected {sorted(expected)} "
                f"for optimizer={self.kind}; was the checkpoint written with another head.optimizer?"
            )
        for name, buffer in expected.items():
            if name not in state:
                buffer.zero_()
                continue
            if tuple(state[name].shape) != tuple(buffer.shape):
                raise ValueError(
                    f"center optimizer state {name!r} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(buffer.shape)}"
                )
            buffer.copy_(state[name])

    @torch.no_grad()
    def step(
        self,
        centers: Tensor,
        grad: Tensor | CenterGrad,
        index: Tensor | None,
        lr: float,
        inv_norms: Tensor | None = None,
    ) -> None:
        """Apply one update. `grad` holds rows `index` (sorted, unique local ids); None = whole shard.

        `inv_norms` ([rows] fp32), if given, is refreshed with 1/||row|| of every row written (while the
        block is in cache), so the next forward need not read the centers to normalise them."""
        shape = tuple(grad.shape) if isinstance(grad, Tensor) else (grad.num_rows, centers.shape[1])
        if shape[1:] != centers.shape[1:] or shape[0] != (centers.shape[0] if index is None else len(index)):
            raise ValueError(
                f"grad of shape {shape} does not match centers {tuple(centers.shape)} "
                f"and index of length {None if index is None else len(index)}"
            )
        kernels = self._fused_kernels(centers, grad, inv_norms)
        if kernels is not None and self.deferred is not None and index is not None:
            with small_ops_serial(centers.device):  # small torch ops on this thread (cpu_threads.py)
                self._update_deferred(kernels, centers, grad, index, lr, inv_norms)
            return
        self.materialize()  # the other paths read every row as current
        if self.deferred is not None:
            self.deferred.reset()  # and leave every row current
        if kernels is not None:
            with small_ops_serial(centers.device):
                self._update_fused(kernels, centers, grad, index, lr, inv_norms)
        elif self.mode == "sparse" and index is not None:
            self._update_rows(centers, grad, index, lr, inv_norms)
        else:
            self._update_dense(centers, grad, index, lr, inv_norms)

    # ------------------------------------------------------------------------------ fused CPU SGD path
    def _fused_kernels(
        self, centers: Tensor, grad: Tensor | CenterGrad, inv_norms: Tensor | None
    ) -> CenterKernels | None:
        """The native kernels when they apply: SGD on CPU, fp32 or bf16 storage, contiguous tensors."""
        if (
            self.kind != "sgd"
            or centers.device.type != "cpu"
            or centers.dtype not in (torch.float32, torch.bfloat16)
        ):
            return None
        state = self._state()
        tensors = [centers, *state.values()] + ([inv_norms] if inv_norms is not None else [])
        if any(not t.is_contiguous() for t in tensors) or any(
            t.dtype != centers.dtype for t in state.values()
        ):
            return None
        if inv_norms is not None and inv_norms.dtype != torch.float32:
            return None
        if (centers.dtype == torch.bfloat16) != (RESIDUAL in state):
            return None
        if isinstance(grad, Tensor):
            if grad.dtype not in (torch.float32, torch.bfloat16) or not grad.is_contiguous():
                return None
        elif grad.x_hat is None or grad.x_hat.dtype not in (torch.float32, torch.bfloat16):
            return None
        return center_kernels()

    def _update_deferred(
        self,
        kernels: CenterKernels,
        centers: Tensor,
        grad: Tensor | CenterGrad,
        index: Tensor,
        lr: float,
        inv_norms: Tensor | None,
    ) -> None:
        """Dense SGD with the unsampled rows' step deferred: the gradient rows are brought up to date (the
        forward normally did that already) and updated; the others record that they missed this step."""
        deferred = self.deferred
        deferred.bind(kernels, centers, self._state(), inv_norms, self.momentum, self.weight_decay, _NORM_EPS)
        deferred.make_room()
        index = index.to(torch.int64).contiguous()
        deferred.catch_up(index)
        self._update_fused(kernels, centers, grad, index, lr, inv_norms, stream_unsampled=False)
        deferred.record(index, lr)

    def _update_fused(
        self,
        kernels: CenterKernels,
        centers: Tensor,
        grad: Tensor | CenterGrad,
        index: Tensor | None,
        lr: float,
        inv_norms: Tensor | None,
        stream_unsampled: bool = True,
    ) -> None:
        """One fused pass per block of gradient rows (equal blocks of at most `_rows_per_block`); dense calls
        also stream the shard rows between this block's first row and the next block's (ghost momentum and
        decay)."""
        state = self._state()
        total = centers.shape[0] if index is None else len(index)
        dense = self.mode == "dense" and index is not None and stream_unsampled
        if index is not None:
            index = index.to(torch.int64).contiguous()
        work_dtype = grad.dtype if isinstance(grad, Tensor) else grad.x_hat.dtype
        batch = 0 if isinstance(grad, Tensor) else grad.x_hat.shape[0]  # tensor rows: no product to form
        size = self.block_size(total, work_dtype, batch)
        for lo in range(0, max(total, 1), max(size, 1)):
            hi = min(lo + size, total)
            block, proj = self._block_gradient(grad, lo, hi, size)
            rows = None if index is None else index[lo:hi]
            span = (0, 0)
            if dense:
                first = 0 if lo == 0 else int(index[lo])
                span = (first, int(index[hi]) if hi < total else centers.shape[0])
            kernels.sgd(
                centers,
                block,
                rows,
                row_base=lo,
                dense_rows=span,
                proj_inv=proj,
                residual=state.get(RESIDUAL),
                momentum=state.get(MOMENTUM),
                inv_norms=inv_norms,
                lr=lr,
                mu=self.momentum,
                wd=self.weight_decay,
                eps=_NORM_EPS,
            )
            del block, proj  # freed before the next block's product is made (not one more on the peak)

    def block_size(self, total: int, dtype: torch.dtype, batch: int = 0) -> int:
        """Rows per block when the fused update takes `total` gradient rows whose products are in `dtype`,
        formed from a `batch`-row G*r (0: gradient rows given as a tensor): equal blocks of at most
        `_rows_per_block` (the head benchmark's GEMM floor forms dW the same way)."""
        cap = self._rows_per_block(dtype, batch)
        return -(-total // max(1, -(-total // cap)))  # ceil(total / number of blocks)

    def _rows_per_block(self, dtype: torch.dtype, batch: int = 0) -> int:
        """`block_rows` if set, else on the CPU 2048 rows, or 10240 for bf16 CenterGrad products: oneDNN's
        bf16 GEMM [rows, B] x [B, D] runs faster in larger blocks, the fp32 one does not (C' = 10k,
        B = 128, 2 threads: bf16 4.7 / 4.25 / 3.9 ms in blocks of 2048 / 5000 / 10000 rows; fp32 on MKL
        10.9 / 12.5 / 12.6, on oneDNN (heads/gemm.py) 5.5 / 5.1 / 7.3 / 7.9 in blocks of 1024 / 2048 / 4096 /
        10240), and a 10240-row bf16 block (10 MB at D = 512) is a few percent of the shard. fp32 products
        of a `batch` above 256 rows take fewer rows, ~2 MiB of G*r a block (oneDNN copies that transposed
        operand, and the product beside it is 2 KiB a row): at B = 512 the first steps' heap grew by 24 MiB
        in 2048-row blocks, 10 in 1024 (C' = 30k; the update as fast: 44.5-45.9 against 45.3-47.9 ms), and
        at B = 1024, 512 or 1024 rows ran the update in 29 ms against 33."""
        if self.block_rows is not None:
            return self.block_rows
        if dtype == torch.bfloat16:
            return _BF16_BLOCK_ROWS
        by_batch = _FP32_FACTOR_BYTES // (dtype.itemsize * max(batch, 1))
        return max(_MIN_BLOCK_ROWS, min(_CPU_BLOCK_ROWS, by_batch))

    def _block_gradient(
        self, grad: Tensor | CenterGrad, lo: int, hi: int, size: int
    ) -> tuple[Tensor, Tensor | None]:
        """Rows [lo, hi) as (tensor, None), or a CenterGrad's product P = (G*r).t() @ x-hat for them and the
        forward's 1/||w|| (the kernel applies the tangent projection P - r^2 (w . P) w itself)."""
        if isinstance(grad, Tensor):
            return grad[lo:hi], None
        scaled, x_hat = grad.grad_scaled, grad.x_hat
        if scaled is None or x_hat is None or grad.w_inv is None:
            raise RuntimeError(
                "no center gradient: call loss.backward() between forward() and optimizer_step()"
            )
        factor, shape = scaled[:, lo:hi].t(), (size, x_hat.shape[1])
        if fresh_product(*shape, factor, x_hat):  # oneDNN returns it as a new tensor: no buffer to keep
            self._product = None
        elif self._product is None or self._product.dtype != x_hat.dtype or self._product.shape != shape:
            self._product = torch.empty(shape, dtype=x_hat.dtype)
        scratch = None if self._product is None else self._product[: hi - lo]
        with all_threads():
            product = matmul(factor, x_hat, scratch=scratch)
        return product, grad.w_inv[lo:hi].float().contiguous()

    # ------------------------------------------------------------------------------------ torch path
    def _rule_state(self, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: buf for name, buf in buffers.items() if name != RESIDUAL}

    def _update_rows(
        self, centers: Tensor, grad: Tensor | CenterGrad, index: Tensor, lr: float, inv_norms: Tensor | None
    ) -> None:
        """Sparse mode: per block of sampled rows, gather rows and state, update in fp32, scatter back."""
        buffers = self._state()
        residual = buffers.get(RESIDUAL)
        rule_state = self._rule_state(buffers)
        block_rows = self._rows_per_block(torch.float32)  # the torch path works on fp32 blocks
        for lo in range(0, len(index), block_rows):
            hi = min(lo + block_rows, len(index))
            rows = index[lo:hi]
            stored = _upcast(centers.index_select(0, rows))  # the rows the forward (and gradient) saw
            block_grad = _grad_rows(grad, lo, hi, stored).to(stored.dtype)
            params = stored if residual is None else stored + residual.index_select(0, rows)
            work = {}
            for name, buf in rule_state.items():
                gathered = buf.index_select(0, rows)
                work[name] = _upcast(gathered) if gathered.is_floating_point() else gathered
            self._apply_rule(params, work, block_grad, None, lr)
            rounded = params.to(centers.dtype)
            centers.index_copy_(0, rows, rounded)
            if residual is not None:
                residual.index_copy_(0, rows, params.sub_(rounded).to(residual.dtype))
            if inv_norms is not None:
                inv_norms.index_copy_(0, rows, inverse_row_norms(rounded, inv_norms.dtype))
            for name, buf in rule_state.items():
                buf.index_copy_(0, rows, work[name].to(buf.dtype))

    def _update_dense(
        self,
        centers: Tensor,
        grad: Tensor | CenterGrad,
        index: Tensor | None,
        lr: float,
        inv_norms: Tensor | None,
    ) -> None:
        """Dense mode: every row moves; rows absent from `index` see a zero gradient. Row-blocked."""
        block_rows = self._rows_per_block(torch.float32)  # the torch path works on fp32 blocks
        starts = list(range(0, centers.shape[0], block_rows))
        if index is not None:  # where each block's slice of the sorted index begins and ends
            bounds = torch.tensor(starts + [centers.shape[0]], device=index.device)
            cuts = torch.searchsorted(index, bounds).tolist()
        buffers = self._state()
        residual = buffers.get(RESIDUAL)
        for block, first in enumerate(starts):
            last = min(first + block_rows, centers.shape[0])
            stored = _upcast(centers[first:last])
            if index is None:
                rows, block_grad = None, _grad_rows(grad, first, last, stored)
            else:
                lo, hi = cuts[block], cuts[block + 1]
                rows = index[lo:hi] - first if hi > lo else None
                block_grad = _grad_rows(grad, lo, hi) if hi > lo else None
            if block_grad is not None:
                block_grad = block_grad.to(stored.dtype)
            params = stored if residual is None else stored + residual[first:last]
            storage = {name: buf[first:last] for name, buf in self._rule_state(buffers).items()}
            work = {name: (_upcast(s) if s.is_floating_point() else s) for name, s in storage.items()}
            self._apply_rule(params, work, block_grad, rows, lr)
            if params.data_ptr() != centers[first:last].data_ptr():  # an up-cast working copy
                centers[first:last].copy_(params)
            if residual is not None:
                residual[first:last].copy_(params.sub_(centers[first:last].to(params.dtype)))
            for name, s in storage.items():
                if work[name] is not s:
                    s.copy_(work[name])
            if inv_norms is not None:
                inverse_row_norms(centers[first:last], inv_norms.dtype, out=inv_norms[first:last])

    def _apply_rule(
        self,
        params: Tensor,
        state: dict[str, Tensor],
        grad: Tensor | None,
        rows: Tensor | None,
        lr: float,
    ) -> None:
        """Update fp32 `params`/`state` in place; `grad` belongs to `rows` of params (None = all rows);
        a None `grad` is an all-zero gradient."""

        def add_grad(target: Tensor, values: Tensor | None, alpha: float) -> None:
            if values is None:  # a dense block without sampled rows: zero gradient
                return
            if rows is None:
                target.add_(values, alpha=alpha)
            else:
                target.index_add_(0, rows, values, alpha=alpha)

        wd = self.weight_decay
        if self.kind == "sgd":
            if self.momentum > 0:  # torch.optim.SGD: buf = momentum*buf + (g + wd*p); p -= lr*buf
                buf = state[MOMENTUM]
                buf.mul_(self.momentum)
                if wd:
                    buf.add_(params, alpha=wd)
                add_grad(buf, grad, 1.0)
                params.add_(buf, alpha=-lr)
            else:
                if wd:
                    params.mul_(1.0 - lr * wd)
                add_grad(params, grad, -lr)
            return
        beta1, beta2 = self.betas  # torch.optim.AdamW, with a per-row step count for bias correction
        steps = state["row_steps"]
        steps.add_(1)
        if wd:
            params.mul_(1.0 - lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1)
        add_grad(exp_avg, grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2)
        add_grad(exp_avg_sq, None if grad is None else grad * grad, 1.0 - beta2)
        step_f = steps.to(torch.float64)[:, None]  # 1 - 0.999**t loses 4 digits in fp32 at small t
        bias1 = (1.0 - torch.pow(beta1, step_f)).to(params.dtype)
        bias2_sqrt = (1.0 - torch.pow(beta2, step_f)).sqrt_().to(params.dtype)
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(self.eps)
        params.addcdiv_(exp_avg / bias1, denom, value=-lr)
