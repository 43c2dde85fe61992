"""Document-causal attention for packed sequences, without a dense ``[b, 1, t, t]`` mask where possible.

A packed row holds several documents back to back; query i may attend key j iff both belong to the same
document and j <= i. The documents are given by per-token document ids ``[b, t]`` (non-decreasing along a
row: see ``packed_document_ids``). A dense boolean mask costs O(t^2) memory and keeps SDPA off its fused
kernels, so the model passes a ``DocumentMask`` instead, computed on one of four backends:

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over the flattened rows, one
  sequence per document, cumulative lengths from the ids). CUDA, fp16/bf16 only.
- ``flex``: FlexAttention with a BlockMask built directly from the ids at block granularity: blocks
  spanning no shared document are skipped, blocks inside one document run unmasked. Compiled once and
  cached. CUDA forward and backward; CPU forward only (torch 2.13 has no FlexAttention backward on CPU).
- ``segments``: one SDPA ``is_causal`` call per document (memory O(sum of document lengths^2) at worst,
  fused CPU/CUDA kernels, dropout supported). The document lengths are read to the host once per forward,
  so it runs in eager mode only.
- ``dense``: the block-diagonal causal boolean mask, for the eager (reference) attention, and where none of
  the above runs (under torch.compile on CPU with gradients, say).

``choose_backend`` is the one place that picks among them.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("varlen", "flex", "segments", "dense")
MASK_BACKENDS = BACKENDS[:3]  # those a DocumentMask runs on; "dense" is a plain [b, 1, t, t] boolean mask
FLEX_BLOCK = 128  # FlexAttention's default block size; the BlockMask is built at this granularity


def packed_document_ids(position_ids: Tensor, batch: int) -> Tensor:
    """``position_ids [b or 1, t]`` -> document index of each token ``[b, t]``, as transformers reads packing
    (``masking_utils.find_packed_sequence_indices``): a new document starts wherever the position does not
    step by exactly 1. The first token starts document 0 whatever its position."""
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


# Looked up once at import (no import of the modules themselves): the answers are constants, also under
# torch.compile, which would trace a cached function's body anew.
_HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


_varlen_usable: bool | None = None


def varlen_available() -> bool:
    """``varlen_attn`` exists and takes the ``window_size`` (causal) and ``enable_gqa`` arguments used here
    (older torch releases lack them: flex is chosen there instead). Decided on first use, because importing it
    costs about a second; choose_backend asks only in eager mode."""
    global _varlen_usable
    if _varlen_usable is None:
        _varlen_usable = False
        if _HAS_VARLEN:
            import inspect

            from torch.nn.attention.varlen import varlen_attn

            _varlen_usable = {"window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters)
    return _varlen_usable


def flex_available() -> bool:
    return _HAS_FLEX


def choose_backend(implementation: str, device: torch.device, dtype: torch.dtype, needs_grad: bool,
                   dropout: float, compiling: bool) -> str:
    """The document-attention backend for one forward.

    ``implementation`` is the model's attn_implementation: "eager" always gets the dense mask (it is the
    readable reference). For "sdpa", in order: varlen on CUDA in fp16/bf16 (fastest; eager mode only, as
    its cumulative lengths have a data-dependent size); FlexAttention on CUDA, and on CPU when compiling
    without gradients; per-document SDPA in eager mode; else dense. Dropout rules out varlen and flex, which
    have none. On CPU in eager mode per-document SDPA is taken even without gradients: compiled FlexAttention's
    forward measured 0.87-1.4x its speed (benchmarks/results/packed-attention-*-forward.json) but compiles
    again for every new shape, where SDPA needs no compiling and also runs backward.
    """
    if implementation == "eager":
        return "dense"
    fused_ok = dropout == 0.0
    cuda = device.type == "cuda"
    if fused_ok and cuda and not compiling and dtype in (torch.float16, torch.bfloat16) and varlen_available():
        return "varlen"
    if fused_ok and flex_available() and (cuda or (compiling and not needs_grad)):
        return "flex"
    return "dense" if compiling else "segments"


@dataclass(frozen=True)
class DocumentMask:
    """What an attention layer needs for document-causal attention on ``backend``; built once per forward
    and shared by all layers. Exactly the fields of its backend are set."""

    doc_ids: Tensor  # [b, t]
    backend: str
    block_mask: object | None = None  # flex: a torch BlockMask
    cu_seqlens: Tensor | None = None  # varlen: [documents + 1] int32 offsets into the flattened b * t tokens
    segments: tuple[int, ...] | None = None  # segments: document lengths, rows laid end to end

    def to(self, device: torch.device) -> DocumentMask:
        """The same mask on ``device`` (a model split across devices hands it over with the activations)."""
        if self.doc_ids.device == device:
            return self
        return build_document_mask(self.doc_ids.to(device), self.backend)


def build_document_mask(doc_ids: Tensor, backend: str) -> DocumentMask:
    """``doc_ids [b, t]`` (non-decreasing along each row) -> the DocumentMask for ``backend``."""
    if backend not in MASK_BACKENDS:
        raise ValueError(f"document attention backend must be one of {MASK_BACKENDS}, got {backend!r}")
    mask = DocumentMask(doc_ids, backend)
    if backend == "flex":
        return replace(mask, block_mask=_flex_block_mask(doc_ids))
    starts = document_starts(doc_ids)
    if backend == "varlen":
        b, t = doc_ids.shape
        offsets = torch.nonzero(starts.flatten()).flatten()
        end = torch.tensor([b * t], device=offsets.device, dtype=offsets.dtype)
        return replace(mask, cu_seqlens=torch.cat([offsets, end]).to(torch.int32))
    offsets = torch.nonzero(starts.flatten()).flatten().tolist()  # the one host sync
    lengths = [e - s for s, e in zip(offsets, [*offsets[1:], starts.numel()], strict=True)]
    return replace(mask, segments=tuple(lengths))


def packed_attention_mask(position_ids: Tensor, batch: int, implementation: str, dtype: torch.dtype,
                          dropout: float) -> DocumentMask | Tensor | None:
    """The attention mask for packed documents told by restarting ``position_ids [b or 1, t]``: None when no
    row restarts (plain causal: SDPA's is_causal path; checked in eager mode only, it reads a value back from
    the device), the dense ``[b, 1, t, t]`` mask when the chosen backend is dense, else a DocumentMask.
    ``dtype`` is the dtype attention computes in (autocast's, where it is on)."""
    doc_ids = packed_document_ids(position_ids, batch)
    compiling = torch.compiler.is_compiling()
    if not compiling and not bool(doc_ids[:, -1].any()):
        return None
    backend = choose_backend(implementation, doc_ids.device, dtype, torch.is_grad_enabled(), dropout, compiling)
    if backend == "dense":
        return dense_document_mask(doc_ids)
    return build_document_mask(doc_ids, backend)


def dense_document_mask(doc_ids: Tensor) -> Tensor:
    """``doc_ids [b, t]`` -> the block-diagonal causal boolean mask ``[b, 1, t, t]`` (True = may attend)."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def document_attention(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask, scale: float,
                       dropout: float) -> Tensor:
    """``q [b, h, t, d]``, ``k/v [b, h_kv, t, d]`` -> ``[b, h, t, d]``, each query seeing its own document's
    earlier keys only. GQA without repeating K/V on every backend."""
    gqa = k.shape[1] != q.shape[1]
    if q.dtype != v.dtype:  # autocast: RoPE's fp32 angles promote q and k; v is in the compute dtype
        q, k = q.to(v.dtype), k.to(v.dtype)  # (SDPA's autocast would cast them so; the kernels below do not)
    if mask.backend == "varlen":
        return _varlen(q, k, v, mask.cu_seqlens, scale, gqa)
    if mask.backend == "flex":
        if torch.compiler.is_compiling():  # inside a compiled model: traced into its graph
            from torch.nn.attention.flex_attention import flex_attention

            return flex_attention(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
        return _compiled_flex()(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)
    return _segments(q, k, v, mask.segments, scale, dropout, gqa)


def document_starts(doc_ids: Tensor) -> Tensor:
    """``[b, t]`` bool: True where a document starts (every row's first token included)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def _segments(q: Tensor, k: Tensor, v: Tensor, lengths: tuple[int, ...], scale: float, dropout: float,
              gqa: bool) -> Tensor:
    b, h, t, d = q.shape

    def pieces(x: Tensor) -> tuple[Tensor, ...]:  # [b, heads, t, d] -> documents of [1, heads, length, d]
        # one split of the rows laid end to end: its backward is one cat, where slicing each document
        # out would give every document a full-size zero gradient to add up
        return x.transpose(0, 1).reshape(1, x.shape[1], b * t, d).split(lengths, dim=2)

    outs = [F.scaled_dot_product_attention(qd, kd, vd, dropout_p=dropout, is_causal=True, scale=scale,
                                           enable_gqa=gqa)
            for qd, kd, vd in zip(pieces(q), pieces(k), pieces(v), strict=True)]
    return torch.cat(outs, dim=2).view(h, b, t, d).transpose(0, 1)  # [1, h, b * t, d] -> [b, h, t, d]


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, gqa: bool) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    b, h, t, d = q.shape

    def flat(x: Tensor) -> Tensor:  # [b, heads, t, d] -> [b * t, heads, d]: one token axis over all rows
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

    # max_q = max_k = t: an upper bound on any document's length, so no host sync to find the longest one;
    # window (-1, 0) is causal attention within each sequence
    out = varlen_attn(flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, t, t, scale=scale, window_size=(-1, 0),
                      enable_gqa=gqa)
    return out.view(b, t, h, d).transpose(1, 2)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (it needs compiling everywhere, and on CPU it runs only
    compiled). Static shapes: a training run has one window length, so one graph."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(doc_ids: Tensor):
    """A BlockMask for document-causal attention, built from ``doc_ids [b, t]`` at block granularity.

    Ids are non-decreasing along a row, so a block's documents are the range [first id, last id]. A key
    block is visited by a query block when it is not in the future and their id ranges overlap; it is "full"
    (the mask_mod is skipped) when it lies strictly in the past and both blocks hold one and the same
    document. Nothing of size t x t is built (create_block_mask would evaluate the mask_mod densely).
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, t = doc_ids.shape
    n = -(-t // FLEX_BLOCK)
    padded = F.pad(doc_ids, (0, n * FLEX_BLOCK - t), mode="replicate").view(b, n, FLEX_BLOCK)
    first, last = padded[..., 0], padded[..., -1]  # [b, n] document range of each block
    block = torch.arange(n, device=doc_ids.device)
    past_or_same = block[None, :] <= block[:, None]  # [q block, kv block]
    overlap = (last[:, None, :] >= first[:, :, None]) & (first[:, None, :] <= last[:, :, None])  # [b, q, kv]
    visited = overlap & past_or_same
    single = first == last  # [b, n]
    full = visited & (block[None, :] < block[:, None]) & single[:, :, None] & single[:, None, :] \
        & (first[:, :, None] == first[:, None, :])
    if t % FLEX_BLOCK:  # a ragged last block is never full: its padding must go through the mask_mod
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = visited & ~full

    def indices(blocks: Tensor) -> tuple[Tensor, Tensor]:  # [b, q, kv] bool -> counts, visited blocks first
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document_causal(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return (doc_ids[bi, qi] == doc_ids[bi, ki]) & (qi >= ki)

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(t, t))
