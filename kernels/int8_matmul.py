"""W8A8 int8 matmul with int32 accumulation, a fused scale/bias epilogue and LLM.int8() outlier columns.

Public surface:
    int8_matmul_ref(a_q, a_scale, w_q, w_scale, bias=None, x=None, outlier_cols=None, out_dtype=...)
    int8_matmul(...)                    the op: Triton where ``triton_runs_on(a_q)``, else a PyTorch path
    int8_linear(x, w_q, w_scale, bias=None, threshold=6.0)   quantise the activations, then int8_matmul

``out[m, n] = (sum_k a_q[m, k] w_q[n, k]) * a_scale[m] * w_scale[n]          (exact int32 sum, fp32 epilogue)
            + (sum_{k outlier} x[m, k] w_q[n, k]) * w_scale[n]               (x's dtype, fp32 accumulation)
            + bias[n]``
with ``w_q [N, K]`` in nn.Linear's layout. The second line is LLM.int8()'s mixed decomposition (Dettmers et
al. 2022): activation columns where any |x| exceeds ``threshold`` are zeroed in ``a_q`` and multiplied in
floating point against the same weight columns dequantised. Unlike bitsandbytes it runs in the
activation's own dtype (no fp16 detour for bf16 models, so no overflow), and in the same kernel as the int8
product: a K-block without outlier columns skips the float dot, a block with some adds one, so the
decomposition costs no host sync, no gather and no second pass over the weights — and stays one graph
under ``torch.compile``.

Without Triton (CPU): ``torch._int_mm`` for the int8 product (exact), the outlier columns gathered and
multiplied in fp32; ``int8_matmul_ref`` is the plain integer-matmul definition the tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import HAS_TRITON, autotuned, interpreting, triton_runs_on
from .int8_quant import quantize_rows
from .int8_split_k import split_k_for, w8a8_split_k

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["int8_linear", "int8_matmul", "int8_matmul_ref"]

DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold


def _epilogue(acc: Tensor, a_scale: Tensor, w_scale: Tensor, float_part: Tensor | None, bias: Tensor | None,
              out_dtype: torch.dtype) -> Tensor:
    out = acc.float() * a_scale[:, None] * w_scale[None, :]  # the kernel's order of fp32 operations
    if float_part is not None:
        out = out + float_part * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_matmul_ref(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                    x: Tensor | None = None, outlier_cols: Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The definition: an exact integer matmul, then the fp32 epilogue (see the module docstring)."""
    # Exact in fp64: every product is an integer of magnitude <= 127^2 and every partial sum stays far below
    # 2^53 (K < 5e11), so no rounding happens in any order. Not int64: CUDA has no int64 matmul.
    acc = a_q.double() @ w_q.double().t()
    float_part = None
    if outlier_cols is not None:
        float_part = (x.float() * outlier_cols) @ w_q.float().t()
    return _epilogue(acc, a_scale, w_scale, float_part, bias, out_dtype)


def _int_mm(a_q: Tensor, w_q: Tensor) -> Tensor:
    """``a_q @ w_q^T`` in int32 by torch._int_mm (exact below 2^31: K * 127^2 fits for K < 133k). Its CUDA
    backend wants M > 16 and K, N multiples of 8: zero padding meets that and keeps the product exact."""
    m, k = a_q.shape
    n = w_q.shape[0]
    if a_q.is_cuda and (m <= 16 or k % 8 or n % 8):
        pad_k, pad_n = -k % 8, -n % 8
        a_q = torch.nn.functional.pad(a_q, (0, pad_k, 0, max(0, 17 - m)))
        w_q = torch.nn.functional.pad(w_q, (0, pad_k, 0, pad_n))
        return torch._int_mm(a_q, w_q.t())[:m, :n]
    return torch._int_mm(a_q, w_q.t())


def _int8_matmul_torch(a_q, a_scale, w_q, w_scale, bias, x, outlier_cols, out_dtype) -> Tensor:
    acc = _int_mm(a_q, w_q)
    float_part = None
    if outlier_cols is not None:
        cols = outlier_cols.nonzero().squeeze(1)  # a host sync; this path is not the fast one anyway
        float_part = x.index_select(1, cols).float() @ w_q.index_select(1, cols).float().t()
    return _epilogue(acc, a_scale, w_scale, float_part, bias, out_dtype)


# ----------------------------------------------------------------------------------------------- kernel
def _int8_matmul_kernel(
    A, W, SA, SW, BIAS, X, OUTLIER, OUT,
    M, N, K, M_BUCKET,  # M_BUCKET: only an autotuning key (decode and prefill shapes tune apart)
    stride_am, stride_wn, stride_xm, stride_om,
    HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr, FLOAT_DOT_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A [M, K] int8, W [N, K] int8 (both last dim contiguous), SA [M] fp32, SW [N] fp32, X [M, K] float,
    # OUTLIER [K] int8, OUT [M, N]. Grouped program order: GROUP_M row-blocks share W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        w = tl.load(W + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(a, w)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] int8 -> int32
        if HAS_OUTLIERS:
            col_is_outlier = tl.load(OUTLIER + kk, mask=kk < K, other=0) != 0
            if tl.max(col_is_outlier.to(tl.int32), axis=0) > 0:  # most K-blocks hold no outlier column
                xo = tl.load(X + rm[:, None] * stride_xm + kk[None, :],
                             mask=(rm[:, None] < M) & col_is_outlier[None, :], other=0.0)
                if FLOAT_DOT_IEEE:  # fp32 activations (no TF32 rounding), or the interpreter (see below)
                    acc_f += tl.dot(xo.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:  # bf16/fp16: int8 values are exact in either
                    acc_f += tl.dot(xo, w.to(xo.dtype))

    out = acc.to(tl.float32) * tl.load(SA + rm, mask=rm < M, other=0.0)[:, None]
    sw = tl.load(SW + rn, mask=rn < N, other=0.0)[None, :]
    out = out * sw
    if HAS_OUTLIERS:
        out += acc_f * sw
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :], out.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _decode_configs() -> list:
    return [triton.Config(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1), num_warps=4, num_stages=s)
            for bn, bk, s in ((32, 256, 4), (64, 128, 5), (64, 256, 4), (128, 128, 4), (128, 256, 3))]


def _middle_configs() -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4)
            for bm, bn in ((32, 64), (64, 64), (64, 128))]


def _prefill_configs() -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                     (128, 128, 64, 4, 4), (64, 256, 128, 8, 3))]


def _small_configs() -> list:
    return _decode_configs() + _middle_configs()


def _large_configs() -> list:
    return _middle_configs() + _prefill_configs()


def _configs_for(m: int):
    """Autotuning candidates pruned by M before any is timed: a 256-row tile for one decode row (or a 16-row
    tile for 4096 rows) never wins, and each candidate costs a compilation and a timing per new shape."""
    return _decode_configs if m <= 16 else _small_configs if m <= 64 else _large_configs


_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
_AUTOTUNE_KEY = ("M_BUCKET", "N", "K", "HAS_OUTLIERS")


def _int8_matmul_triton(a_q, a_scale, w_q, w_scale, bias, x, outlier_cols, out_dtype,
                        split_k: int | None = None) -> Tensor:
    """``split_k``: K-slices (None: ``split_k_for`` decides, 1: this kernel; see kernels/int8_split_k.py)."""
    m, k = a_q.shape
    n = w_q.shape[0]
    a_q, w_q = a_q.contiguous(), w_q.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    has_outliers = outlier_cols is not None
    if has_outliers and x.stride(-1) != 1:
        x = x.contiguous()
    split = split_k_for(m, n, k, a_q.device) if split_k is None else split_k
    if split > 1:
        return w8a8_split_k(a_q, a_scale, w_q, w_scale, bias, x, outlier_cols, out, split)
    kernel, config = autotuned(_int8_matmul_kernel, _configs_for(m), _AUTOTUNE_KEY, _INTERPRETER_CONFIG)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        a_q, w_q, a_scale.contiguous(), w_scale.contiguous(), bias if bias is not None else w_scale,
        x if has_outliers else a_q, outlier_cols.to(torch.int8) if has_outliers else a_q, out,
        m, n, k, min(triton.next_power_of_2(m), 4096),
        a_q.stride(0), w_q.stride(0), x.stride(0) if has_outliers else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers,
        # Triton's interpreter multiplies bf16 tiles as raw bits: it gets the same products in fp32 (a
        # bf16 x int8 product is exact in fp32, so only the summation order can differ from the GPU).
        FLOAT_DOT_IEEE=has_outliers and (x.dtype == torch.float32 or interpreting()), **config)
    return out


# ----------------------------------------------------------------------------------------------- op
@torch.library.custom_op("llama_core::int8_matmul", mutates_args=())
def _int8_matmul_op(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                    x: Tensor | None, outlier_cols: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    impl = _int8_matmul_triton if triton_runs_on(a_q) else _int8_matmul_torch
    return impl(a_q, a_scale, w_q, w_scale, bias, x, outlier_cols, out_dtype)


@_int8_matmul_op.register_fake
def _(a_q, a_scale, w_q, w_scale, bias, x, outlier_cols, out_dtype):
    return a_q.new_empty((a_q.shape[0], w_q.shape[0]), dtype=out_dtype)


def int8_matmul(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                x: Tensor | None = None, outlier_cols: Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``a_q [M, K] int8 @ w_q [N, K] int8 ^T`` with the epilogue of the module docstring -> ``[M, N]``."""
    if a_q.dtype != torch.int8 or w_q.dtype != torch.int8 or a_q.dim() != 2 or w_q.dim() != 2:
        raise ValueError(f"int8_matmul: a_q and w_q must be 2-D int8, got {a_q.dtype} {tuple(a_q.shape)} and "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    m, k = a_q.shape
    if w_q.shape[1] != k or a_scale.shape != (m,) or w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"int8_matmul: shapes do not fit: a_q {tuple(a_q.shape)}, a_scale {tuple(a_scale.shape)}, "
                         f"w_q {tuple(w_q.shape)}, w_scale {tuple(w_scale.shape)}")
    if (x is None) != (outlier_cols is None):
        raise ValueError("int8_matmul: pass x and outlier_cols together (or neither)")
    return _int8_matmul_op(a_q, a_scale.float(), w_q, w_scale.float(), bias, x, outlier_cols, out_dtype)


def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``x [..., K] @ dequant(w_q, w_scale)^T + bias`` in W8A8: per-token dynamic activation quantisation,
    then the int8 GEMM, with LLM.int8() outlier columns (|x| > threshold anywhere in the batch) kept in x's
    dtype. ``threshold=0`` disables the decomposition (pure W8A8). Output in x's dtype. Inference only."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    outliers = (x2.abs() > threshold).any(dim=0) if threshold > 0 else None  # [K] bool, stays on device
    a_q, a_scale = quantize_rows(x2, outliers)
    out = int8_matmul(a_q, a_scale, w_q, w_scale, bias, x2 if outliers is not None else None, outliers, x.dtype)
    return out.view(*x.shape[:-1], w_q.shape[0])
