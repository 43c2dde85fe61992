"""The per-token building blocks: RMSNorm, the SwiGLU MLP and the pre-norm decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._runtime import use_triton_op

from .attention import Attention
from .cache import Cache
from .config import LlamaConfig
from .document_attention import DocumentMask
from .linear import linear
from .rope import RopeAngles


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) with HF/Meta numerics.

    The mean of squares is reduced in fp32, the normalised activations are cast back to the input dtype,
    and only then multiplied by the weight: the order matters for bf16 parity with the reference.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, kernels: str = "auto",
                 device: torch.device | str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """norm(x), or with ``residual``: ``(norm(x + residual), x + residual)`` (fused in the kernel)."""
        if use_triton_op(self.kernels, x):
            from kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.kernels = config.kernels
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(self.gate_proj, x, self.kernels), linear(self.up_proj, x, self.kernels)
        return linear(self.down_proj, F.silu(gate) * up, self.kernels)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)

    def forward(self, x: Tensor, rope: RopeAngles, mask: Tensor | DocumentMask | None, cache: Cache | None = None,
                cache_position: Tensor | None = None) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_position)
        h, x = self.post_attention_layernorm(attn, residual=x)  # x = x + attn; h = norm(x), one kernel
        return x + self.mlp(h)
