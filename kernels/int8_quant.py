"""Dynamic per-token int8 quantisation of activations (absmax, symmetric), the first half of a W8A8 linear.

Public surface:
    quantize_rows_ref(x, outlier_cols=None)   the pure-PyTorch reference
    quantize_rows(x, outlier_cols=None)       the op: Triton where ``triton_runs_on(x)``, else the reference

For ``x [M, K]`` (float) it returns ``q [M, K] int8`` and ``scale [M] fp32`` with ``x ~= q * scale``:
``scale = absmax / 127`` per row and ``q = floor(x / scale + 0.5)``, clamped to [-127, 127] (symmetric:
-128 is never produced, so negation is exact). The rounding is written out as floor(v + 0.5) rather than
left to a rounding mode, the math is fp32 and both divisions are IEEE round-to-nearest, so kernel and
reference agree bit for bit. A row of zeros gets scale 0 and q 0.

``outlier_cols`` (``[K]`` bool) marks the columns LLM.int8() keeps in floating point: they are zeroed in
``q`` and excluded from the absmax, so one outlier column cannot flatten the resolution of the rest; the
int8 matmul (``kernels.int8_matmul``) multiplies those columns in the activation's own dtype.

The kernel is one program per row (a row is read twice: absmax, then quantise; the second read hits L2),
launched by ``int8_linear`` right before the GEMM inside the same op, so ``torch.compile`` sees one op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import HAS_TRITON, jitted, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["quantize_rows", "quantize_rows_ref", "quantize_weight"]


def quantize_rows_ref(x: Tensor, outlier_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: ``x [M, K]`` -> ``(q [M, K] int8, scale [M] fp32)``; see the module docstring."""
    xf = x.float()
    if outlier_cols is not None:
        xf = xf.masked_fill(outlier_cols, 0.0)
    scale = xf.abs().amax(dim=-1) / 127.0  # [M]
    q = torch.floor(xf / scale.masked_fill(scale == 0, 1.0)[:, None] + 0.5).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of a ``[N, K]`` linear weight: ``(w_q [N, K] int8, scale [N] fp32)``.

    The same rule as the activations (absmax / 127, round half up), applied along K; done once, in PyTorch,
    in blocks of rows so that its fp32 temporaries stay small (quantising while loading must not need a
    multiple of the largest weight in scratch memory)."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    # ~1 MB of fp32 per temporary on a CPU (host RSS while loading); ~64 MB on a GPU, where launches cost more
    rows = max(1, (1 << (24 if weight.is_cuda else 18)) // max(k, 1))
    for start in range(0, n, rows):
        q[start:start + rows], scale[start:start + rows] = quantize_rows_ref(weight[start:start + rows])
    return q, scale


# ----------------------------------------------------------------------------------------------- kernel
def _quantize_kernel(X, Q, S, OUTLIER, K, stride_xm, BLOCK_K: tl.constexpr, HAS_OUTLIERS: tl.constexpr):
    # X [M, K] (last dim contiguous), Q [M, K] int8 contiguous, S [M] fp32, OUTLIER [K] int8 (1 = float col).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_OUTLIERS:
            x = tl.where(tl.load(OUTLIER + cols, mask=cols < K, other=0) != 0, 0.0, x)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(absmax, axis=0), 127.0)
    tl.store(S + row, scale)
    safe_scale = tl.where(scale > 0, scale, 1.0)  # a zero row: 0 / 1 -> q = 0
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_OUTLIERS:
            x = tl.where(tl.load(OUTLIER + cols, mask=cols < K, other=0) != 0, 0.0, x)
        # A division, not x * (1 / scale): a multiply followed by + 0.5 may be contracted into one FMA on
        # the GPU (rounding once where the reference rounds twice); a division never is.
        q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x, safe_scale) + 0.5), -127.0), 127.0)
        tl.store(Q + row * K + cols, q.to(tl.int8), mask=cols < K)


def _quantize_triton(x: Tensor, outlier_cols: Tensor | None) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    outliers = outlier_cols.to(torch.int8) if outlier_cols is not None else q  # q: an unused placeholder
    block_k = min(4096, triton.next_power_of_2(k))
    jitted(_quantize_kernel)[(m,)](x, q, scale, outliers, k, x.stride(0), BLOCK_K=block_k,
                                   HAS_OUTLIERS=outlier_cols is not None,
                                   num_warps=8 if block_k >= 2048 else 4)
    return q, scale


# ----------------------------------------------------------------------------------------------- op
@torch.library.custom_op("llama_core::int8_quantize_rows", mutates_args=())
def _quantize_op(x: Tensor, outlier_cols: Tensor | None) -> tuple[Tensor, Tensor]:
    if triton_runs_on(x):
        return _quantize_triton(x, outlier_cols)
    return quantize_rows_ref(x, outlier_cols)


@_quantize_op.register_fake
def _(x, outlier_cols):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def quantize_rows(x: Tensor, outlier_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantisation of ``x [M, K]``; see the module docstring."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows: x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    if outlier_cols is not None and (outlier_cols.shape != (x.shape[1],) or outlier_cols.dtype != torch.bool):
        raise ValueError(f"quantize_rows: outlier_cols must be a bool [{x.shape[1]}] tensor, got "
                         f"{tuple(outlier_cols.shape)} {outlier_cols.dtype}")
    return _quantize_op(x, outlier_cols)
