"""Torch dequantisation of GGML's block types, one function per type: ``(blocks, out) -> None`` takes the raw
bytes of ``n`` blocks as a uint8 tensor ``(n, type_size)`` and writes their float32 values into ``out``
``(n, block_size)``. ``gguf_quants.dequantize`` is the public entry point; this module holds the block
arithmetic (and the shared helpers), the legacy 32-element types included, so that ``gguf_quants`` stays the
dispatcher.

Each function performs the same float32 operations in the same order as gguf's numpy reference (which
mirrors llama.cpp's ``dequantize_row_*``): the fp16 scales widened to float32 (and multiplied by the K-quants'
integer sub-scales), the integer quants made float exactly (offsets such as -8 applied before, in uint8 read
as int8: exact either way), then one multiplication (and for types with a minimum one subtraction or
addition), each rounded separately. Separate in-place ``mul_``/``sub_`` calls cannot fuse into an FMA, so
the results are bit-equal.
Byte layouts are in the comments (offsets in bytes within a block; "nibble" = 4 bits, low one first).
"""

from __future__ import annotations

import torch

NIBBLES = (0, 4)  # shifts of the fields of a byte: 4-bit, 2-bit, 1-bit
CRUMBS = (0, 2, 4, 6)
BITS = tuple(range(8))


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of each block as float32 ``(n, 1)`` (every such field in ggml's
    structs sits at an even offset, and every type_size is even, so the uint8 -> float16 view is legal)."""
    return blocks[:, offset:offset + 2].view(torch.float16).float()


def split(bytes_: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """``(..., width)`` bytes -> ``(..., len(shifts), width)`` bit fields: field ``s`` of byte ``j`` is
    ``(byte >> shifts[s]) & mask``. This is ggml's order: all elements of the first field of a run of bytes
    come first, then those of the next field, so the element index is ``s * width + j`` within the run.

    One scalar shift and mask per field, stacked: these run vectorised, where a broadcast shift by a tensor
    of shifts (numpy's formulation) is ~4x slower in torch. Contiguous bytes first, for the same reason."""
    x = bytes_.contiguous()
    top = 8 - mask.bit_length()  # the field at this shift needs no mask
    return torch.stack([x & mask if s == 0 else x >> s if s == top else (x >> s).bitwise_and_(mask)
                        for s in shifts], dim=-2)


def nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """The 16 nibble bytes of a 32-element block -> ``(n, 32)`` uint8: elements 0..15 are the low nibbles,
    16..31 the high ones."""
    return split(qs, NIBBLES, 0x0F).view(qs.shape[0], 32)


def high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """The little-endian uint32 ``qh`` (4 bytes) of Q5_0/Q5_1 -> ``(n, 32)`` uint8: bit ``j`` is element
    ``j``'s fifth bit, which is bit ``j % 8`` of byte ``j // 8``."""
    return split(qh.unsqueeze(-1), BITS, 1).view(qh.shape[0], 32)


# ------------------------------------------------------------------------------------- 32-element blocks
def q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    """34 bytes: d fp16, 32 x int8. x = q * d."""
    out.copy_(b[:, 2:].view(torch.int8)).mul_(f16_at(b, 0))


def q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    """18 bytes: d fp16, 16 nibble bytes. x = d * (q - 8)."""
    out.copy_(nibbles32(b[:, 2:]).sub_(8).view(torch.int8)).mul_(f16_at(b, 0))


def q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    """20 bytes: d fp16, m fp16, 16 nibble bytes. x = d * q + m."""
    out.copy_(nibbles32(b[:, 4:])).mul_(f16_at(b, 0)).add_(f16_at(b, 2))


def q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    """22 bytes: d fp16, qh uint32 (fifth bits), 16 nibble bytes. x = d * (q - 16)."""
    q = nibbles32(b[:, 6:]).bitwise_or_(high_bits32(b[:, 2:6]).bitwise_left_shift_(4))
    out.copy_(q.sub_(16).view(torch.int8)).mul_(f16_at(b, 0))


def q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    """24 bytes: d fp16, m fp16, qh uint32, 16 nibble bytes. x = d * q + m."""
    q = nibbles32(b[:, 8:]).bitwise_or_(high_bits32(b[:, 4:8]).bitwise_left_shift_(4))
    out.copy_(q).mul_(f16_at(b, 0)).add_(f16_at(b, 2))


# ------------------------------------------------------------------------ K-quants: 256-element super-blocks
def q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """84 bytes: 16 scale bytes (low nibble: scale, high nibble: min of a 16-element group), 64 bytes of 2-bit
    quants (two runs of 32 bytes, four fields each), d fp16, dmin fp16. x = (d * sc) * q - (dmin * m)."""
    n = b.shape[0]
    scales = b[:, :16]
    dl = (f16_at(b, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (f16_at(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = split(b[:, 16:80].view(n, 2, 32), CRUMBS, 0x03)
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(dl).sub_(ml)


def q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """110 bytes: hmask (32 bytes, the third bit of each quant, eight fields), 64 bytes of 2-bit quants (as
    Q2_K), 12 bytes of sixteen 6-bit scales (low nibbles in bytes 0..7, top two bits in 8..11), d fp16.
    x = (d * (sc - 32)) * (q2 - 4 * (1 - h)): a set hmask bit means no offset."""
    n = b.shape[0]
    sc = b[:, 96:108]
    low = split(sc[:, :8].unsqueeze(1), NIBBLES, 0x0F).view(n, 16)
    high = split(sc[:, 8:].unsqueeze(1), CRUMBS, 0x03).view(n, 16)
    dl = (f16_at(b, 108) * (low.bitwise_or_(high.bitwise_left_shift_(4)).float() - 32)).view(n, 16, 1)
    q = split(b[:, 32:96].view(n, 2, 32), CRUMBS, 0x03).view(n, 16, 16)
    h = split(b[:, :32].unsqueeze(1), BITS, 1).view(n, 16, 16)
    # q2 - 4 * (1 - h) == (q2 | h << 2) - 4: in uint8 (wrapping), read as int8, converted to float exactly
    out.view(n, 16, 16).copy_(q.bitwise_or_(h.bitwise_left_shift_(2)).sub_(4).view(torch.int8)).mul_(dl)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins ``(n, 8)``: bytes 0..3 and 4..7
    hold scales/mins 0..3 in their low six bits and the top two bits of scales/mins 4..7 in their high two
    bits; bytes 8..11 hold the low nibbles of scales 4..7 (low) and mins 4..7 (high)."""
    s, m, sm = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat([s & 0x3F, (sm & 0x0F) | ((s >> 2) & 0x30)], dim=-1)
    min_ = torch.cat([m & 0x3F, (sm >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, min_


def q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """144 bytes: d fp16, dmin fp16, 12 scale bytes, 128 nibble bytes (four runs of 32: low nibbles are one
    32-element group, high nibbles the next). x = (d * sc) * q - (dmin * m)."""
    n = b.shape[0]
    scale, min_ = _scale_min_k4(b[:, 4:16])
    dl = (f16_at(b, 0) * scale.float()).view(n, 8, 1)
    ml = (f16_at(b, 2) * min_.float()).view(n, 8, 1)
    q = split(b[:, 16:].view(n, 4, 32), NIBBLES, 0x0F).view(n, 8, 32)
    out.view(n, 8, 32).copy_(q).mul_(dl).sub_(ml)


def q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """176 bytes: d fp16, dmin fp16, 12 scale bytes (as Q4_K), qh (32 bytes: fifth bits, eight fields, one per
    32-element group), 128 nibble bytes (as Q4_K). x = (d * sc) * q - (dmin * m)."""
    n = b.shape[0]
    scale, min_ = _scale_min_k4(b[:, 4:16])
    dl = (f16_at(b, 0) * scale.float()).view(n, 8, 1)
    ml = (f16_at(b, 2) * min_.float()).view(n, 8, 1)
    q = split(b[:, 48:].view(n, 4, 32), NIBBLES, 0x0F).view(n, 8, 32)
    h = split(b[:, 16:48].unsqueeze(1), BITS, 1).view(n, 8, 32)
    out.view(n, 8, 32).copy_(q.bitwise_or_(h.bitwise_left_shift_(4))).mul_(dl).sub_(ml)


def q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    """210 bytes: ql (128 bytes: low nibbles, two runs of 64, two fields each), qh (64 bytes: top two bits, two
    runs of 32, four fields each), 16 int8 scales, d fp16. x = (d * sc) * (q - 32)."""
    n = b.shape[0]
    dl = (f16_at(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    low = split(b[:, :128].view(n, 2, 64), NIBBLES, 0x0F).view(n, 8, 32)
    high = split(b[:, 128:192].view(n, 2, 32), CRUMBS, 0x03).view(n, 8, 32)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).sub_(32).view(torch.int8)
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(dl)
