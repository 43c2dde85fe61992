"""Weight-only int8 matmul: int8 weights with per-output-channel scales, activations stay in their dtype.

Public surface:
    int8_weight_only_matmul_ref(x, w_q, w_scale, bias=None)   the pure-PyTorch reference
    int8_weight_only_matmul(x, w_q, w_scale, bias=None)       the op: Triton where ``triton_runs_on(x)``

``out[m, n] = (sum_k x[m, k] w_q[n, k]) * w_scale[n] + bias[n]`` with fp32 accumulation, output in x's
dtype. Decoding at small batch is bound by reading the weights; int8 halves those bytes against bf16 and
the per-channel scale is applied once per output, after the K loop, so the inner loop is a plain
dequantise-free ``dot(x, w.to(x.dtype))`` (int8 values are exact in bf16/fp16). At decode sizes the K loop
may be split over programs (kernels/int8_split_k.py).

Without Triton: ``torch.ops.aten._weight_int8pack_mm`` (PyTorch's own CPU weight-only kernel) for a few
rows in half precision, else the weights converted to x's dtype and a BLAS matmul, scaled per output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import HAS_TRITON, autotuned, interpreting, triton_runs_on
from .int8_split_k import split_k_for, weight_only_split_k

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["int8_weight_only_matmul", "int8_weight_only_matmul_ref"]


def int8_weight_only_matmul_ref(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: fp32 matmul against the int8 weights (exact as fp32 values), scale, bias, cast to x's dtype."""
    out = (x.float() @ w_q.float().t()) * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _weight_only_torch(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    if x.device.type == "cpu" and x.shape[0] <= 16 and x.dtype in (torch.bfloat16, torch.float16):
        # torch's CPU weight-only kernel: good at decode sizes in half precision (measured far slower than a
        # dequantised BLAS matmul for fp32 or many rows on a 2-core CPU).
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), w_q.contiguous(), w_scale.to(x.dtype))
    else:  # dequantise into x's dtype (int8 values are exact there) and let BLAS do it; scale per output
        out = ((x @ w_q.to(x.dtype).t()).float() * w_scale.float()).to(x.dtype)
    return out + bias if bias is not None else out


# ----------------------------------------------------------------------------------------------- kernel
def _weight_only_kernel(
    X, W, SW, BIAS, OUT, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # X [M, K] float, W [N, K] int8 (last dims contiguous), SW [N] fp32, OUT [M, N] in X's dtype.
    pid_n = tl.program_id(0)  # N-blocks first: at decode shapes the whole grid is one row of M
    pid_m = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if IEEE:  # fp32 activations (no TF32 rounding), or the interpreter (see the launcher)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = acc * tl.load(SW + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :], out.to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _decode_configs() -> list:
    return [triton.Config(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk), num_warps=4, num_stages=s)
            for bn, bk, s in ((32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 3), (128, 128, 3))]


def _prefill_configs() -> list:
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3))]


def _all_configs() -> list:
    return _decode_configs() + _prefill_configs()


def _configs_for(m: int):
    """Autotuning candidates pruned by M (each costs a compilation and a timing per new shape): 16-row tiles
    up to 16 rows, the large ones above 64, all between."""
    return _decode_configs if m <= 16 else _prefill_configs if m > 64 else _all_configs


_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


def _launch_plain(x, w_q, w_scale, bias, out, m, n, k):
    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

    kernel, config = autotuned(_weight_only_kernel, _configs_for(m), ("M_BUCKET", "N", "K"),
                               _INTERPRETER_CONFIG)
    kernel[grid](
        x, w_q, w_scale.float().contiguous(), bias if bias is not None else w_scale, out,
        m, n, k, min(triton.next_power_of_2(m), 4096), x.stride(0), w_q.stride(0), out.stride(0),
        # Triton's interpreter multiplies bf16 tiles as raw bits; fp32 gives it the same exact products.
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32 or interpreting(),
        **config)


def _weight_only_triton(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                        split_k: int | None = None) -> Tensor:
    """``split_k``: K-slices for the split-K path (None: :func:`split_k_for` decides; 1: the plain kernel)."""
    m, k = x.shape
    n = w_q.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_q = w_q.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    split = split_k_for(m, n, k, x.device) if split_k is None else split_k
    if split > 1:
        weight_only_split_k(x, w_q, w_scale, bias, out, split)
    else:
        _launch_plain(x, w_q, w_scale, bias, out, m, n, k)
    return out


# ----------------------------------------------------------------------------------------------- op
@torch.library.custom_op("llama_core::int8_weight_only_matmul", mutates_args=())
def _weight_only_op(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    impl = _weight_only_triton if triton_runs_on(x) else _weight_only_torch
    return impl(x, w_q, w_scale, bias)


@_weight_only_op.register_fake
def _(x, w_q, w_scale, bias):
    return x.new_empty((x.shape[0], w_q.shape[0]))


def int8_weight_only_matmul(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [..., K] @ (w_q [N, K] * w_scale[:, None])^T + bias`` -> ``[..., N]`` in x's dtype."""
    if not x.is_floating_point() or w_q.dtype != torch.int8 or w_q.dim() != 2 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"int8_weight_only_matmul: need float x [..., K] and int8 w_q [N, K], got x "
                         f"{x.dtype} {tuple(x.shape)}, w_q {w_q.dtype} {tuple(w_q.shape)}")
    if w_scale.shape != (w_q.shape[0],):
        raise ValueError(f"int8_weight_only_matmul: w_scale must be [{w_q.shape[0]}], got {tuple(w_scale.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    return _weight_only_op(x2, w_q, w_scale, bias).view(*x.shape[:-1], w_q.shape[0])
