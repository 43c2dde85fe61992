"""Split-K for the int8 GEMMs at decode sizes (M <= 16 rows), weight-only and W8A8.

Why: at decode sizes the plain kernels have one program per BLOCK_N outputs, 32 to 128 programs for N = 4096,
too few to keep an H100/H200's 132 SMs streaming the weights, which is all a decode step does. Split-K gives
each program a slice of K as well. Each program writes its partial sums to its own slot of a
``[SPLIT_K, M, N]`` buffer, and a second kernel adds the slots in a fixed order and applies the epilogue:
deterministic (no atomics), and safe to rerun (the autotuner times a kernel by running it many times).

W8A8: the partials are int32, so their sum is the exact integer product and the output equals the plain
kernel's and the reference's bit for bit (the same fp32 epilogue, in the same order); the outlier columns'
float partials are summed in slot order. Weight-only: fp32 partials, a different summation grouping than
the plain kernel, within the same recursive-summation bound.

Used by ``kernels/int8_weight_only.py`` and ``kernels/int8_matmul.py`` where :func:`split_k_for` says so;
``SPLIT_K_MAX_M = 0`` turns it off (benchmarks/gpu_check.py measures both and says which to keep).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import HAS_TRITON, autotuned, interpreting, jitted

if HAS_TRITON:
    import triton
    import triton.language as tl

SPLIT_K_MAX_M = 16  # rows up to which split-K may be used; 0 disables it
SPLIT_K_CHOICES = (1, 2, 4, 8)
_MIN_K_PER_SPLIT = 512
_SLICE_ALIGN = 256  # the largest BLOCK_K of the configs: every slice boundary is a multiple of each of them
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
_REDUCE_BLOCK = 1024
# Both GEMMs share the split kernel: its variant flags are part of the tuning key (as are the shapes).
_AUTOTUNE_KEY = ("N", "K", "K_PER_SPLIT", "INT8_A", "HAS_OUTLIERS")


def split_k_for(m: int, n: int, k: int, device: torch.device) -> int:
    """K-slices for an ``[m, k] @ [n, k]^T`` product: the most (up to 8) that keep the programs (at 64 outputs
    each) within two waves of the SMs and each slice at least 512 deep; 1 above ``SPLIT_K_MAX_M`` rows and
    wherever the plain grid already fills the device (N = 14336 on 132 SMs)."""
    if m > SPLIT_K_MAX_M or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = triton.cdiv(n, 64)
    best = 1
    for split in SPLIT_K_CHOICES:
        if programs * split <= 2 * sms and k // split >= _MIN_K_PER_SPLIT:
            best = split
    return best


def _decode_configs() -> list:
    return [triton.Config(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk), num_warps=4, num_stages=s)
            for bn, bk, s in ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 3), (128, 128, 3))]


def _slices(m: int, k: int, split: int) -> tuple[int, int]:
    """(slice depth, slices): the depth a multiple of every BLOCK_K, no empty slice."""
    if m > 16:
        raise ValueError(f"int8 split-K handles up to 16 rows (one BLOCK_M), got {m}")
    depth = triton.cdiv(triton.cdiv(k, split), _SLICE_ALIGN) * _SLICE_ALIGN
    return depth, triton.cdiv(k, depth)


# ----------------------------------------------------------------------------------------------- kernels
def _split_kernel(
    A, W, X, OUTLIER, PI, PF, M, N, K, K_PER_SPLIT, stride_am, stride_wn, stride_xm,
    INT8_A: tl.constexpr, HAS_OUTLIERS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (n, s): outputs [0, M) x [n * BLOCK_N, ...) over K in [s * K_PER_SPLIT, ...).
    # INT8_A (W8A8): A [M, K] int8 -> int32 partials in PI; X [M, K] float outlier columns -> fp32 PF.
    # Weight-only: A [M, K] float -> fp32 partials in PF.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < k_end),
                    other=0)
        w = tl.load(W + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < k_end),
                    other=0)
        if INT8_A:
            acc_i += tl.dot(a, w)
            if HAS_OUTLIERS:
                col_is_outlier = tl.load(OUTLIER + kk, mask=kk < k_end, other=0) != 0
                if tl.max(col_is_outlier.to(tl.int32), axis=0) > 0:
                    xo = tl.load(X + rm[:, None] * stride_xm + kk[None, :],
                                 mask=(rm[:, None] < M) & col_is_outlier[None, :], other=0.0)
                    if IEEE:
                        acc_f += tl.dot(xo.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                    else:
                        acc_f += tl.dot(xo, w.to(xo.dtype))
        elif IEEE:
            acc_f += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc_f += tl.dot(a, w.to(a.dtype))
    slot = pid_s * M * N + rm[:, None] * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if INT8_A:
        tl.store(PI + slot, acc_i, mask=mask)
    if HAS_OUTLIERS or not INT8_A:
        tl.store(PF + slot, acc_f, mask=mask)


def _reduce_kernel(PI, PF, SA, SW, BIAS, OUT, M, N, SPLIT_K: tl.constexpr, INT8_A: tl.constexpr,
                   HAS_FLOAT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # Slots summed in order, then the plain kernels' epilogue, in their order of fp32 operations.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    rows, cols = offs // N, offs % N
    sw = tl.load(SW + cols, mask=mask, other=0.0)
    if INT8_A:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(PI + s * M * N + offs, mask=mask, other=0)
        out = acc.to(tl.float32) * tl.load(SA + rows, mask=mask, other=0.0)
        out = out * sw
    if HAS_FLOAT:
        acc_f = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc_f += tl.load(PF + s * M * N + offs, mask=mask, other=0.0)
        if INT8_A:
            out += acc_f * sw
        else:
            out = acc_f * sw
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers
def _launch(a: Tensor, w_q: Tensor, a_scale: Tensor | None, w_scale: Tensor, bias: Tensor | None,
            x: Tensor | None, outlier_cols: Tensor | None, out: Tensor, split: int) -> Tensor:
    (m, k), n = a.shape, w_q.shape[0]
    depth, split = _slices(m, k, split)
    int8_a, has_outliers = a.dtype == torch.int8, outlier_cols is not None
    has_float = has_outliers or not int8_a
    p_int = torch.empty((split, m, n), dtype=torch.int32, device=a.device) if int8_a else None
    p_float = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if has_float else None
    float_in = x if has_outliers else a
    ieee = has_float and (float_in.dtype == torch.float32 or interpreting())

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), split)

    kernel, config = autotuned(_split_kernel, _decode_configs, _AUTOTUNE_KEY, _INTERPRETER_CONFIG)
    kernel[grid](a, w_q, x if has_outliers else a, outlier_cols.to(torch.int8) if has_outliers else a,
                 p_int if p_int is not None else p_float, p_float if p_float is not None else p_int,
                 m, n, k, depth, a.stride(0), w_q.stride(0), x.stride(0) if has_outliers else 0,
                 INT8_A=int8_a, HAS_OUTLIERS=has_outliers, IEEE=ieee, **config)
    placeholder = w_scale
    jitted(_reduce_kernel)[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
        p_int if p_int is not None else p_float, p_float if p_float is not None else p_int,
        a_scale if a_scale is not None else placeholder, w_scale, bias if bias is not None else placeholder, out,
        m, n, SPLIT_K=split, INT8_A=int8_a, HAS_FLOAT=has_float, HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK)
    return out


def weight_only_split_k(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, out: Tensor,
                        split: int) -> Tensor:
    """``out = x @ (w_q * w_scale)^T + bias`` with K split ``split`` ways (x [M <= 16, K] float, contiguous rows)."""
    return _launch(x, w_q, None, w_scale.float().contiguous(), bias, None, None, out, split)


def w8a8_split_k(a_q: Tensor, a_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None, x: Tensor | None,
                 outlier_cols: Tensor | None, out: Tensor, split: int) -> Tensor:
    """The W8A8 product with K split ``split`` ways; same arguments and epilogue as ``int8_matmul``."""
    return _launch(a_q, w_q, a_scale.contiguous(), w_scale.contiguous(), bias, x, outlier_cols, out, split)
