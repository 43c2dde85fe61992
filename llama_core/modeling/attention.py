"""Grouped-query attention (MHA, GQA, MQA) with SDPA and eager backends, and the mask they share.

Masks are boolean ``[batch, 1, q_len, kv_len]`` with True where a query may attend, or None for the
plain causal case (no padding, nothing cached) so SDPA can take its ``is_causal`` fast path. Callers may
pass such a 4-D mask themselves (as transformers allows), e.g. a block-diagonal causal mask for packed
documents; it is used as given. Packed documents told by restarting position_ids instead get a
``DocumentMask`` (``document_attention.py``), which runs on fused kernels without any ``[t, t]`` tensor.

Head counts are read from the projections' output shapes, not the config, so the same code runs under
tensor parallelism, where q/k/v_proj hold only this rank's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels._runtime import use_triton_op

from .cache import Cache
from .config import LlamaConfig
from .document_attention import DocumentMask, document_attention
from .linear import linear
from .rope import RopeAngles, apply_rope

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def build_attention_mask(attention_mask: Tensor | None, cache_position: Tensor, kv_len: int,
                         can_skip: bool) -> Tensor | None:
    """The boolean attention mask for queries at cache indices ``cache_position [q_len]``.

    ``attention_mask [batch, past + q_len]`` is the HF 2-D padding mask (1 = real token). ``can_skip`` says
    the keys are exactly the cache's first ``past + q_len`` slots with past == 0 or q_len == 1; then, with
    no padding, the mask is pure causality and None is returned. A query that is itself padding would
    attend to nothing (NaN in softmax); it may attend to itself instead, which keeps its (ignored) output
    finite and never reaches a real token.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(device=cache_position.device, dtype=torch.bool)  # caller's own [b, 1, q, kv]
    if can_skip and (attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all()))):
        return None
    device = cache_position.device
    kv_index = torch.arange(kv_len, device=device)
    allowed = kv_index[None, :] <= cache_position[:, None]  # [q, kv] causal; also hides unused static slots
    if attention_mask is None:
        return allowed[None, None]
    padding = attention_mask.to(device=device, dtype=torch.bool)
    if padding.shape[-1] < kv_len:  # static cache: slots past the mask are unused
        padding = F.pad(padding, (0, kv_len - padding.shape[-1]), value=False)
    allowed = allowed[None] & padding[:, None, :kv_len]  # [batch, q, kv]
    allowed = allowed | (kv_index[None, None, :] == cache_position[None, :, None])
    return allowed[:, None]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout: float) -> Tensor:
    """``q [b, h, t, d]``, ``k/v [b, h_kv, s, d]`` -> ``[b, h, t, d]``; GQA without repeating K/V."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and q.shape[-2] > 1,
        scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout: float) -> Tensor:
    """Explicit softmax(q k^T * scale) v with the softmax in fp32; readable reference for research forks.

    GQA is computed by viewing the query heads as ``[kv_heads, group]`` and broadcasting K/V over the
    group dimension, so the repeated K/V are never materialised.
    """
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    q = q.view(b, h_kv, h // h_kv, t, d)
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)).float() * scale  # [b, h_kv, g, t, s]
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask.dim() == 4:
        mask = mask.unsqueeze(2)  # [b, 1, 1, t, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, v.unsqueeze(2))  # [b, h_kv, g, t, d]
    return out.reshape(b, h, t, d)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention}


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.backend = config.attn_implementation
        self.kernels = config.kernels
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x: Tensor, rope: RopeAngles, mask: Tensor | DocumentMask | None, cache: Cache | None,
                cache_position: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        # -1, not num_heads: under tensor parallelism the projections give this rank's heads only
        q = linear(self.q_proj, x, self.kernels).view(b, t, -1, self.head_dim)  # [b, t, h, d]
        k = linear(self.k_proj, x, self.kernels).view(b, t, -1, self.head_dim)  # [b, t, h_kv, d]
        v = linear(self.v_proj, x, self.kernels).view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, h_kv, t, d]
        q, k = self._rotate(q, k, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)
        if rope.key_cos is not None:  # dynamic NTK with a cache: the whole cache, with today's frequencies
            k = apply_rope(k, rope.key_cos, rope.key_sin)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, DocumentMask):  # packed documents: the backend was chosen once for all layers
            out = document_attention(q, k, v, mask, self.scale, dropout)
        else:
            out = ATTENTION_BACKENDS[self.backend](q, k, v, mask, self.scale, dropout)
        return linear(self.o_proj, out.transpose(1, 2).reshape(b, t, -1), self.kernels)  # -> [b, t, hidden]

    def _rotate(self, q: Tensor, k: Tensor, rope: RopeAngles) -> tuple[Tensor, Tensor]:
        """``q [b, t, h, d]``, ``k [b, t, h_kv, d]`` -> rotated ``[b, h, t, d]``, ``[b, h_kv, t, d]``.
        With a dynamic-NTK cache (``rope.key_cos`` set) keys stay un-rotated: they are cached as they are."""
        if rope.key_cos is not None:
            return apply_rope(q.transpose(1, 2), rope.cos, rope.sin), k.transpose(1, 2)
        if use_triton_op(self.kernels, q):
            from kernels.rope import rope as rope_kernel

            # q and k in one launch; the kernel computes the angles (positions * inv_freq) in fp32 itself
            q, k = rope_kernel(q, k, rope.position_ids, rope.inv_freq, rope.scaling)
            return q.transpose(1, 2), k.transpose(1, 2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
