"""Fused rotary position embedding (RoPE) for queries and keys: one Triton launch, forward and backward.

``rope(q, k, position_ids, inv_freq, attention_scaling, interleaved)`` rotates ``q [batch, seq, n_heads,
head_dim]`` and ``k [batch, seq, n_kv_heads, head_dim]`` (any GQA ratio) by the angles
``position_ids [batch, seq] * inv_freq`` (``[head_dim // 2]``, or ``[batch, head_dim // 2]`` for dynamic
NTK). The angles are computed inside the kernel in fp32 and cos/sin multiplied by ``attention_scaling``
(YaRN's mscale), so every rope type of ``llama_core.modeling.rope`` works from its ``inv_freq`` alone: no cos/sin
table is read from memory. The math is fp32 with one rounding to the input dtype at the end.

Layout: rotate-half (HF) by default, ``out[:d/2] = x1 cos - x2 sin, out[d/2:] = x2 cos + x1 sin``;
``interleaved=True`` rotates adjacent pairs ``(x[2i], x[2i+1])`` (Meta's original layout).

Backward: a rotation is orthogonal, so the input gradient is the output gradient rotated by the negative
angle: the same kernel with sin negated. Both directions are ``torch.library`` custom ops
(``llama_core::rope``, ``llama_core::rope_backward``) with fake implementations, so ``torch.compile``
traces through them without graph breaks. Where Triton does not run (CPU without ``TRITON_INTERPRET=1``)
the ops run ``rope_ref``, the pure-PyTorch reference with llama_core's numerics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import HAS_TRITON, jitted, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope", "rope_ref"]


# ----------------------------------------------------------------------------------------------- reference
def _cos_sin(position_ids: Tensor, inv_freq: Tensor, attention_scaling: float, dtype: torch.dtype,
             interleaved: bool) -> tuple[Tensor, Tensor]:
    """cos/sin ``[batch, seq, head_dim]`` in ``dtype``; the same ops as ``RotaryEmbedding.cos_sin``."""
    if inv_freq.dim() == 1:
        inv_freq = inv_freq[None, :]
    freqs = position_ids[..., None].float() * inv_freq[:, None, :].float()  # [batch, seq, head_dim/2], fp32
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate(x: Tensor, interleaved: bool) -> Tensor:
    """The 90-degree turn of each pair: rotate_half (HF) or its adjacent-pair version (Meta)."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))  # [..., head_dim/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _rope_torch(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
                interleaved: bool, sign: float) -> tuple[Tensor, Tensor]:
    cos, sin = _cos_sin(position_ids, inv_freq, attention_scaling, q.dtype, interleaved)
    cos, sin = cos[:, :, None, :], sign * sin[:, :, None, :]  # broadcast over heads of [b, s, h, d]
    return q * cos + _rotate(q, interleaved) * sin, k * cos.to(k.dtype) + _rotate(k, interleaved) * sin.to(k.dtype)


def rope_ref(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0,
             interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch RoPE with llama_core's numerics: fp32 angles, cos/sin cast to the activation dtype,
    then ``x * cos + rotate_half(x) * sin`` in that dtype (``RotaryEmbedding.cos_sin`` + ``apply_rope``,
    on ``[batch, seq, heads, head_dim]``). Differentiable; the CPU fallback of ``rope``."""
    return _rope_torch(q, k, position_ids, inv_freq, attention_scaling, interleaved, 1.0)


# ----------------------------------------------------------------------------------------------- kernel
if HAS_TRITON:

    def _rope_kernel(  # a plain function: jitted at launch (_runtime.jitted)
        q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, freq_ptr,
        seq_len, n_qh, n_kh,
        stride_qb, stride_qs, stride_qh,  # q's last dim is contiguous (the launcher ensures it)
        stride_kb, stride_ks, stride_kh,
        stride_pb, stride_ps, stride_fb,  # stride_fb is 0 when inv_freq is shared by all rows
        scaling,
        HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
        INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        # One program per token: cos/sin are computed once and reused for all its q and k heads.
        token = tl.program_id(0).to(tl.int64)  # int64: token * heads * head_dim passes 2^31 at long context
        b = token // seq_len
        s = token % seq_len

        # Angles in fp32, as in RotaryEmbedding.cos_sin (position ids are exact in fp32 below 2^24).
        half = tl.arange(0, BLOCK_HALF)
        half_mask = half < HEAD_DIM // 2  # BLOCK_HALF is padded to a power of two (head_dim 80 -> 64)
        pos = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.float32)
        freq = tl.load(freq_ptr + b * stride_fb + half, mask=half_mask, other=0.0)
        angle = pos * freq
        cos = (tl.cos(angle) * scaling)[None, :]
        sin = (tl.sin(angle) * scaling)[None, :]
        if BACKWARD:
            sin = -sin  # the transpose of a rotation is the rotation by minus the angle

        # Offsets of the two elements of each rotated pair inside one head.
        if INTERLEAVED:
            off1 = 2 * half
            off2 = 2 * half + 1
        else:
            off1 = half
            off2 = half + HEAD_DIM // 2
        off1 = off1[None, :]
        off2 = off2[None, :]

        # Queries: [BLOCK_QH, BLOCK_HALF] tiles of both halves, looped when there are more heads.
        q_row = q_ptr + b * stride_qb + s * stride_qs
        q_out_row = q_out_ptr + token * n_qh * HEAD_DIM  # outputs are contiguous [tokens, heads, head_dim]
        for h0 in range(0, n_qh, BLOCK_QH):
            heads = h0 + tl.arange(0, BLOCK_QH)[:, None]
            mask = (heads < n_qh) & half_mask[None, :]
            x1 = tl.load(q_row + heads * stride_qh + off1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(q_row + heads * stride_qh + off2, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            tl.store(q_out_row + heads * HEAD_DIM + off1, y1.to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(q_out_row + heads * HEAD_DIM + off2, y2.to(q_out_ptr.dtype.element_ty), mask=mask)

        # Keys: the same rotation, inline (a helper would have to be jitted per mode as well).
        k_row = k_ptr + b * stride_kb + s * stride_ks
        k_out_row = k_out_ptr + token * n_kh * HEAD_DIM
        for h0 in range(0, n_kh, BLOCK_KH):
            heads = h0 + tl.arange(0, BLOCK_KH)[:, None]
            mask = (heads < n_kh) & half_mask[None, :]
            x1 = tl.load(k_row + heads * stride_kh + off1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(k_row + heads * stride_kh + off2, mask=mask, other=0.0).to(tl.float32)
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            tl.store(k_out_row + heads * HEAD_DIM + off1, y1.to(k_out_ptr.dtype.element_ty), mask=mask)
            tl.store(k_out_row + heads * HEAD_DIM + off2, y2.to(k_out_ptr.dtype.element_ty), mask=mask)


def _launch_config(head_dim: int, n_qh: int, n_kh: int) -> dict[str, int]:
    """Block sizes: one tile holds up to ~4096 elements (both halves), e.g. 32 heads x 128 at head_dim 128."""
    block_half = triton.next_power_of_2(head_dim // 2)
    max_heads = max(1, 2048 // block_half)
    return dict(BLOCK_HALF=block_half, BLOCK_QH=min(triton.next_power_of_2(n_qh), max_heads),
                BLOCK_KH=min(triton.next_power_of_2(n_kh), max_heads), num_warps=4)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    # Strided batch/seq/head dims are read in place (e.g. q, k as views of a fused qkv projection).
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_triton(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
                 interleaved: bool, backward: bool) -> tuple[Tensor, Tensor]:
    batch, seq, n_qh, head_dim = q.shape
    n_kh = k.shape[2]
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    position_ids = position_ids.expand(batch, seq)  # [1, seq] broadcasts with stride 0
    inv_freq = inv_freq.to(torch.float32).contiguous()
    freq_stride = 0 if inv_freq.dim() == 1 or inv_freq.shape[0] == 1 else inv_freq.stride(0)  # shared row
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous [batch, seq, heads, head_dim]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if batch * seq == 0:
        return q_out, k_out
    jitted(_rope_kernel)[(batch * seq,)](
        q, k, q_out, k_out, position_ids, inv_freq,
        seq, n_qh, n_kh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        position_ids.stride(0), position_ids.stride(1), freq_stride,
        float(attention_scaling),
        HEAD_DIM=head_dim, INTERLEAVED=interleaved, BACKWARD=backward,
        **_launch_config(head_dim, n_qh, n_kh),
    )
    return q_out, k_out


def _rope_impl(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
               interleaved: bool, backward: bool) -> tuple[Tensor, Tensor]:
    if triton_runs_on(q):
        return _rope_triton(q, k, position_ids, inv_freq, attention_scaling, interleaved, backward)
    sign = -1.0 if backward else 1.0
    q_out, k_out = _rope_torch(q, k, position_ids.expand(q.shape[0], q.shape[1]), inv_freq, attention_scaling,
                               interleaved, sign)
    # Same (contiguous) layout as the kernel's outputs, which the fake implementations promise.
    return q_out.contiguous(), k_out.contiguous()


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("llama_core::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
             interleaved: bool) -> tuple[Tensor, Tensor]:
    return _rope_impl(q, k, position_ids, inv_freq, attention_scaling, interleaved, backward=False)


@torch.library.custom_op("llama_core::rope_backward", mutates_args=())
def _rope_backward_op(grad_q: Tensor, grad_k: Tensor, position_ids: Tensor, inv_freq: Tensor,
                      attention_scaling: float, interleaved: bool) -> tuple[Tensor, Tensor]:
    return _rope_impl(grad_q, grad_k, position_ids, inv_freq, attention_scaling, interleaved, backward=True)


@_rope_op.register_fake
def _rope_fake(q, k, position_ids, inv_freq, attention_scaling, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@_rope_backward_op.register_fake
def _rope_backward_fake(grad_q, grad_k, position_ids, inv_freq, attention_scaling, interleaved):
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, _, position_ids, inv_freq, attention_scaling, interleaved = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.attention_scaling, ctx.interleaved = attention_scaling, interleaved


def _rope_grad(ctx, grad_q, grad_k):
    position_ids, inv_freq = ctx.saved_tensors
    grad_q, grad_k = _rope_backward_op(grad_q, grad_k, position_ids, inv_freq, ctx.attention_scaling,
                                       ctx.interleaved)
    return grad_q, grad_k, None, None, None, None


def _rope_backward_grad(ctx, grad_q, grad_k):
    # rope_backward is linear in its inputs with the transposed rotation, so its own gradient is rope.
    position_ids, inv_freq = ctx.saved_tensors
    grad_q, grad_k = _rope_op(grad_q, grad_k, position_ids, inv_freq, ctx.attention_scaling, ctx.interleaved)
    return grad_q, grad_k, None, None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_setup_context)
_rope_backward_op.register_autograd(_rope_backward_grad, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public op
def rope(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0,
         interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate ``q [batch, seq, n_heads, head_dim]`` and ``k [batch, seq, n_kv_heads, head_dim]`` in one launch.

    ``position_ids [batch, seq]`` (integer; per row, so left padding works; ``[1, seq]`` broadcasts),
    ``inv_freq`` fp32 ``[head_dim // 2]`` or ``[batch, head_dim // 2]``. Returns new contiguous tensors in
    the input dtypes. Differentiable with respect to ``q`` and ``k``.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    batch, seq, n_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq or head_dim")
    if head_dim % 2 or n_heads % k.shape[2]:
        raise ValueError(f"rope: head_dim ({head_dim}) must be even and n_heads ({n_heads}) a multiple of "
                         f"n_kv_heads ({k.shape[2]})")
    if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"rope: position_ids must be [batch, seq] = [{batch}, {seq}], got "
                         f"{tuple(position_ids.shape)}")
    if position_ids.is_floating_point():
        raise TypeError(f"rope: position_ids must be an integer tensor, got {position_ids.dtype}")
    rows = inv_freq.shape[0] if inv_freq.dim() == 2 else batch
    if inv_freq.shape[-1] != head_dim // 2 or inv_freq.dim() not in (1, 2) or rows not in (1, batch):
        raise ValueError(f"rope: inv_freq must be [{head_dim // 2}] or [{batch}, {head_dim // 2}], got "
                         f"{tuple(inv_freq.shape)}")
    return _rope_op(q, k, position_ids, inv_freq, float(attention_scaling), bool(interleaved))
