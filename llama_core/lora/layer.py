"""LoraLinear: ``base(x) + scaling * B(A(dropout(x)))`` around a frozen linear layer.

The base is an ``nn.Linear`` or a weight-only int8 ``Int8Linear`` (QLoRA-style: the frozen base is stored in
int8, the adapters train in full precision and the gradient reaches the input through the dequantised base).
It is kept as the child ``base_layer`` and the adapters as ``lora_A`` / ``lora_B``, PEFT's own module layout,
so the adapter parameters are named ``<linear>.lora_A.weight`` exactly as PEFT saves them.

``linear(layer, x)`` (modeling/linear.py) calls ``layer(x)`` for any type other than a plain nn.Linear or a
weight-only Int8Linear, so compiled one-token decoding never takes its reduction shortcut past an adapter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..quant import Int8Linear


class LoraLinear(nn.Module):
    """One adapter of rank ``r`` on ``base_layer``. ``A`` starts Kaiming-uniform and ``B`` at zero (as PEFT and
    the paper), so a fresh adapter leaves the model's outputs unchanged."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        if type(base_layer) is Int8Linear and base_layer.mode != "int8-weight-only":
            raise ValueError("LoRA over an int8 layer needs mode 'int8-weight-only' (the W8A8 mode quantises "
                             "activations per token and has no gradient)")
        if type(base_layer) not in (nn.Linear, Int8Linear):
            raise TypeError(f"LoRA wraps nn.Linear or Int8Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_layer.weight
        # Adapters of an int8 base train in fp32 (QLoRA keeps its adapters in the compute precision or above).
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, scaling
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        # In the adapter's dtype (PEFT does the same); autocast, where active, picks the matmul precision.
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in fp32, ``[out, in]``: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Fold the adapter into the base weight in place (forward then skips it). Only over nn.Linear: an int8
        base would have to be requantised, and with a per-channel step far above a typical adapter update the
        merge would mostly round the adapter away (and unmerge could not undo it). Use ``merged_linear()``,
        which builds a full-precision layer from the dequantised base instead."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged")
        self._check_mergeable()
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo ``merge()`` (exact up to the rounding of the weight's dtype)."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        with torch.no_grad():
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear computing this layer's output: base (dequantised if int8) plus the adapter, in
        ``dtype`` (default: the base weight's, fp32 for an int8 base)."""
        base = self.base_layer
        if type(base) is Int8Linear:
            weight = base.dequantized_weight(torch.float32)
            dtype = dtype or torch.float32
        else:
            weight = base.weight.detach().float()
            dtype = dtype or base.weight.dtype
        if not self.merged:
            weight = weight + self.delta_weight().detach()
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return merged

    def _check_mergeable(self) -> None:
        if type(self.base_layer) is Int8Linear:
            raise ValueError("cannot merge a LoRA adapter into int8 weights in place: requantising would round "
                             "most of the adapter away; use merge_and_unload(model), which merges into the "
                             "dequantised full-precision weight")

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
