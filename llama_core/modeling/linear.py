"""Linear layers at the op boundary: ``linear(layer, x, kernels)`` is ``layer(x)``, with one fast path.

One-token decoding on a CPU reads every weight once per step, so its speed is the speed of a matrix-vector
product against memory. PyTorch's CPU GEMV (MKL / oneDNN at one row) runs well below the machine's memory
bandwidth (one thread for fp32: ~15 GB/s against the ~45 GB/s two threads reach on a 2-core EPYC). Written
as an explicit reduction, ``(w * x).sum(-1)`` with fp32 accumulation, the same product becomes an
inductor-generated loop that streams the weight on every core with vectorised multiply-adds: 3x faster for
fp32 at one row, 1.3x for bf16, and weight-only int8 dequantises inside that loop (no dequantised copy).

So the path applies only where it wins: inside ``torch.compile`` (eagerly the reduction would materialise
``w * x``), on a CPU, for a single row (measured: at two or more rows BLAS catches up, sooner in bf16), and
not with ``kernels="torch"`` (the plain reference everywhere). Everything else, prefill and batches
included, is ``layer(x)`` unchanged; so are layers of other types (LoRA wrappers, W8A8 Int8Linear).
Numerics: fp32 products summed in fp32 (another order than BLAS: fp32 results agree to rounding, not bit
for bit); bf16/fp16 weights are upcast inside the loop, the result cast back once, as BLAS does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant import Int8Linear

# Rows (tokens x batch) up to which the reduction beats BLAS on a CPU (measured on a 2-core EPYC: 3x fp32 and
# 1.3x bf16 at one row; at two rows bf16 BLAS is as fast, at four fp32 BLAS wins on a 49152 x 576 head).
CPU_REDUCTION_MAX_ROWS = 1


def uses_cpu_reduction(x: Tensor, kernels: str) -> bool:
    """Whether ``linear`` takes the reduction path for input ``x`` (``[..., in_features]``)."""
    return (kernels != "torch" and x.device.type == "cpu" and torch.compiler.is_compiling()
            and x.numel() // x.shape[-1] <= CPU_REDUCTION_MAX_ROWS)


def linear(layer: nn.Module, x: Tensor, kernels: str = "auto") -> Tensor:
    """``layer(x)``, or the CPU one-row reduction where it applies (see the module docstring)."""
    if uses_cpu_reduction(x, kernels):
        if type(layer) is nn.Linear:
            return reduction_linear(x, layer.weight, layer.bias)
        if type(layer) is Int8Linear and layer.mode == "int8-weight-only":
            return reduction_linear(x, layer.weight, layer.bias, layer.weight_scale)
    return layer(x)


def reduction_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` as a broadcast multiply and a sum over the last axis:
    ``x [..., K]``, ``weight [N, K]`` (float, or int8 with fp32 per-row ``scale [N]``) -> ``[..., N]`` in x's
    dtype. Only worth it compiled, where the product is never materialised."""
    out = (weight.float() * x.float().unsqueeze(-2)).sum(-1)  # [..., 1, K] * [N, K] -> [..., N]
    if scale is not None:
        out = out * scale  # once per output, after the sum, as the int8 kernels do
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
