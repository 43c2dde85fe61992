"""Row permutation of q/k projections between Meta's interleaved RoPE layout and HF's rotate-half layout.

Meta (and llama2.c) rotate adjacent pairs (x0, x1), (x2, x3), ... of each head; HF rotates the two halves
(x0, x_{d/2}), (x1, x_{d/2+1}), .... The same attention results when the output rows of wq and wk are
reordered within each head: Meta row 2i -> HF row i, Meta row 2i+1 -> HF row d/2 + i. For GQA, wk has
``num_key_value_heads`` heads. Pure reindexing: bit-exact in both directions.
"""

from __future__ import annotations

import torch


def _check(w: torch.Tensor, n_heads: int) -> int:
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot permute a tensor with {rows} rows for {n_heads} heads (need an even head_dim)")
    return rows // n_heads


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/llama2.c layout -> HF layout for the rows of a q or k projection ``[n_heads * head_dim, ...]``."""
    head_dim = _check(w, n_heads)
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF layout -> Meta layout (the inverse of :func:`interleaved_to_half`)."""
    head_dim = _check(w, n_heads)
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)
