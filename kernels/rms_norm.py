"""Fused RMSNorm (Zhang & Sennrich 2019), optionally fused with the residual add, forward and backward.

Public surface:
    rms_norm_ref(x, weight, eps, residual=None)   the pure-PyTorch reference (HF/Meta numerics)
    rms_norm(x, weight, eps, residual=None)       the op: Triton where ``triton_runs_on(x)``, else the reference

Numerics follow ``llama_core.modeling.layers.RMSNorm`` exactly: the mean of squares is reduced in fp32, x * rstd is
cast back to the input dtype, and only then multiplied by the weight (output dtype = torch promotion of
weight and x). With ``residual`` the sum ``x + residual`` is taken first in x's dtype and returned as the
new residual stream, as in Liger-Kernel / vLLM's fused add-norm.

The Triton path goes through ``torch.library`` custom ops (``llama_core::rms_norm``,
``llama_core::rms_norm_residual``, ``llama_core::rms_norm_backward``) with fake implementations, so
``torch.compile(fullgraph=True)`` sees one opaque op instead of tracing into Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._runtime import HAS_TRITON, jitted, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl

# Rows whose power-of-two width fits this many elements are normalised from registers in one pass
# (x is read once); wider rows loop over column blocks of LOOP_BLOCK_N and read x twice (the second read
# mostly hits L2). Module attributes so tests can force the loop at tiny sizes.
MAX_SINGLE_PASS_N = 16384
LOOP_BLOCK_N = 4096
TILE_ELEMENTS = 4096  # rows per program: pack small rows until a tile holds about this many elements
BWD_PROGRAMS_PER_SM = 2  # persistent backward grid; each program writes one fp32 dW partial row


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """HF RMSNorm; with ``residual`` returns ``(normed, x + residual)``, else ``normed``."""
    if residual is not None:
        x = x + residual
        new_residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return (out, new_residual) if residual is not None else out


# ----------------------------------------------------------------------------------------------------------
# Kernels (plain functions, jitted at launch by _runtime.jitted so TRITON_INTERPRET is read then)
# ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(X, R, W, Y, RES, RSTD, M, N, eps,
                HAS_RESIDUAL: tl.constexpr, SINGLE_PASS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # X, R, RES: [M, N] input dtype; Y: [M, N] output dtype; W: [N]; RSTD: [M] fp32. One program: BLOCK_M rows.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_off = rows.to(tl.int64)[:, None] * N  # int64: M * N can pass 2**31
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(X + row_off + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row_off + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum rounds to x's dtype, as in torch
            tl.store(RES + row_off + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        x_hat = (xf * rstd[:, None]).to(x.dtype)  # cast BEFORE the weight (HF order)
        y = x_hat.to(tl.float32) * w[None, :]
        tl.store(Y + row_off + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum of squares (and the residual sum, stored for pass 2 and the caller).
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(X + row_off + c[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(R + row_off + c[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
                tl.store(RES + row_off + c[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        SRC = RES if HAS_RESIDUAL else X  # constexpr condition: resolved at compile time
        # Pass 2: normalise.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(SRC + row_off + c[None, :], mask=mask, other=0.0)
            w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            x_hat = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
            y = x_hat.to(tl.float32) * w[None, :]
            tl.store(Y + row_off + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward. With x the fp32 upcast of the normalised input (x, or x + residual), r = rstd and
#     x_hat = x * r,   r = (mean(x**2) + eps) ** -1/2,   y = w * cast(x_hat)
# the cast to the input dtype has an identity derivative (autograd's ToCopyBackward just converts the
# gradient), so with g = dy * w (fp32) and dr/dx_j = -r**3 * x_j / N:
#     dx_j = sum_i g_i * d x_hat_i / d x_j = r * (g_j - x_hat_j * mean(g * x_hat))
# using the *fp32* x_hat here, while dW = sum over rows of dy * cast(x_hat) uses the *cast* x_hat that the
# forward multiplied by the weight. The residual sum s = x + residual feeds both the norm and the returned
# stream, so d x = d residual = dx + d s_out. Everything is computed in fp32 and rounded once at the store
# (the reference rounds dy * w to the output dtype first: we are at least as accurate).
# dW: each program owns a contiguous chunk of rows and writes its fp32 partial sum to DW_PART[pid, :]
# (no atomics, deterministic); the host sums the [num_programs, N] buffer.
def _bwd_kernel(DY, X, W, RSTD, DRES, DX, DW_PART, M, N, rows_per_program,
                HAS_DRES: tl.constexpr, SINGLE_PASS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for row0 in range(row_start, row_end, BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            x_hat = x.to(tl.float32) * rstd[:, None]
            dw_acc += dy * x_hat.to(x.dtype).to(tl.float32)
            g = dy * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / N
            dx = rstd[:, None] * (g - x_hat * c[:, None])
            if HAS_DRES:
                dx += tl.load(DRES + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + tl.cast(pid, tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    else:
        # Wide rows, one at a time: pass 1 reduces mean(g * x_hat), pass 2 writes dx and the dW partials
        # (accumulated in this program's own row of DW_PART, zero-initialised by the host).
        for row in range(row_start, row_end):
            base = tl.cast(row, tl.int64) * N
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                x = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                acc += dy * w * x
            mean_gx = tl.sum(acc, axis=0) * rstd / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                x = tl.load(X + base + c, mask=m, other=0.0)
                dy = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                x_hat = x.to(tl.float32) * rstd
                dx = rstd * (dy * w - x_hat * mean_gx)
                if HAS_DRES:
                    dx += tl.load(DRES + base + c, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + base + c, dx.to(DX.dtype.element_ty), mask=m)
                part = DW_PART + tl.cast(pid, tl.int64) * N + c
                tl.store(part, tl.load(part, mask=m, other=0.0) + dy * x_hat.to(x.dtype).to(tl.float32), mask=m)


# ----------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------


def _launch_config(n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps) for rows of ``n`` elements."""
    block_n = triton.next_power_of_2(n)
    single = block_n <= MAX_SINGLE_PASS_N
    if not single:
        block_n = LOOP_BLOCK_N
    block_m = max(1, min(16, TILE_ELEMENTS // block_n)) if single else 1
    tile = block_m * block_n
    # Liger-style: about 16 elements (two 16-byte vectors of bf16) per thread.
    num_warps = 16 if tile >= 16384 else 8 if tile >= 4096 else 4 if tile >= 1024 else 2
    return block_m, block_n, single, num_warps


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()  # [..., N] -> [M, N], a copy only if not contiguous


launches = {"fwd": 0, "bwd": 0}  # counts kernel launches (tests use it to prove the Triton path ran)


def _fwd_triton(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None):
    n = x.shape[-1]
    x2 = _as_rows(x)  # [M, N]
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    r2 = _as_rows(residual) if residual is not None else x2
    block_m, block_n, single, num_warps = _launch_config(n)
    jitted(_fwd_kernel)[(triton.cdiv(m, block_m),)](
        x2, r2, weight.contiguous(), y, res if res is not None else y, rstd, m, n, eps,
        HAS_RESIDUAL=residual is not None, SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps)
    launches["fwd"] += 1
    return y, res, rstd


def _num_programs(m: int, block_m: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few programs still exercise the two-stage dW reduction
    return max(1, min(target, triton.cdiv(m, block_m)))


def _bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dres: Tensor | None):
    n = x.shape[-1]
    x2, dy2 = _as_rows(x), _as_rows(dy)  # [M, N]
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, single, num_warps = _launch_config(n)
    programs = _num_programs(m, block_m, x.device)
    rows_per_program = triton.cdiv(m, programs)
    # Round up to whole tiles so that no two programs share a tile.
    rows_per_program = triton.cdiv(rows_per_program, block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_part = torch.zeros(programs, n, dtype=torch.float32, device=x.device)  # [programs, N]
    jitted(_bwd_kernel)[(programs,)](
        dy2, x2, weight.contiguous(), rstd.contiguous(), _as_rows(dres) if dres is not None else dy2,
        dx, dw_part, m, n, rows_per_program,
        HAS_DRES=dres is not None, SINGLE_PASS=single, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps)
    launches["bwd"] += 1
    return dx, dw_part.sum(0).to(weight.dtype)


# Pure-PyTorch versions of the same computations, for the ops called where Triton does not run.
def _fwd_torch(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = weight * (xf * rstd[..., None]).to(x.dtype)
    return y, (x if residual is not None else None), rstd


def _bwd_torch(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dres: Tensor | None):
    x_hat = x.float() * rstd[..., None]
    dyf = dy.float()
    g = dyf * weight.float()
    dx = rstd[..., None] * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + dres.float()
    dw = (dyf * x_hat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("llama_core::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, _, rstd = (_fwd_triton if triton_runs_on(x) else _fwd_torch)(x, weight, eps, None)
    return y, rstd


@torch.library.custom_op("llama_core::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return (_fwd_triton if triton_runs_on(x) else _fwd_torch)(x, weight, eps, residual)


@torch.library.custom_op("llama_core::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                          dres: Tensor | None) -> tuple[Tensor, Tensor]:
    return (_bwd_triton if triton_runs_on(x) else _bwd_torch)(dy, x, weight, rstd, dres)


def _fake_outputs(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return _fake_outputs(x, weight)


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps):
    y, rstd = _fake_outputs(x, weight)
    return y, torch.empty_like(x, memory_format=torch.contiguous_format), rstd


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dres):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight = inputs[0], inputs[-2]
    # Save the tensor that was normalised: x, or the residual sum (an output, so no extra memory).
    ctx.save_for_backward(output[1] if len(output) == 3 else x, weight, output[-1])


def _grads(ctx, dy: Tensor | None, dres: Tensor | None) -> tuple[Tensor, Tensor]:
    x, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the residual stream was used
        dy = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    return _rms_norm_backward_op(dy, x, weight, rstd, dres)


def _backward(ctx, dy, drstd):
    dx, dw = _grads(ctx, dy, None)
    return dx, dw, None


def _backward_residual(ctx, dy, dres, drstd):
    dx, dw = _grads(ctx, dy, dres)
    return dx, dx, dw, None  # x and residual enter only through their sum


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
_rms_norm_residual_op.register_autograd(_backward_residual, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm of ``x`` [..., N] with ``weight`` [N]; with ``residual`` returns ``(normed, x + residual)``.

    Runs the fused Triton kernels where ``triton_runs_on(x)``, else ``rms_norm_ref``; both differentiable.
    """
    if not triton_runs_on(x):
        return rms_norm_ref(x, weight, eps, residual)
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if residual is None:
        return _rms_norm_op(x, weight, eps)[0]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    y, res, _ = _rms_norm_residual_op(x, residual, weight, eps)
    return y, res
