"""GGML tensor types to torch and back: ``dequantize`` turns a GGUF tensor's raw data into a torch tensor,
``quantize`` turns a torch tensor into what ``gguf.GGUFWriter.add_tensor`` takes.

GGML stores a row of ``ne0`` elements as consecutive blocks (llama.cpp's ``ggml-common.h``): a block of 32
(the legacy Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or a 256-element super-block (the K-quants Q2_K..Q6_K) holds fp16
scales (and minima) and packed 2..8-bit integers; ``x = d * q`` or ``d * q + m``, with K-quants scaling
16- or 32-element groups by small integer scales times the fp16 super-scale. A row never splits a block.
The layouts and the arithmetic per type are in ``gguf_kquants``.

Two implementations are kept for each type: gguf's numpy one (``gguf.quants``, llama.cpp's own Python
reference, an optional dependency imported only when called) and a vectorised torch one written here. The
torch one does the same float32 operations in the same order, so the two agree bit for bit; it exists for
speed: numpy runs each of its ~10 elementwise passes on one thread and, for the bit fields, broadcasts
shifts over small arrays, where torch runs vectorised passes on all of torch's threads (2-4x faster here).
Both run over chunks of rows written into the output: gguf's own ``dequantize`` on a whole tensor gathers
the pieces in a list before concatenating them, two fp32 copies at its peak, too many for a 128k x 4096
embedding. ``impl="auto"`` takes whichever measured faster (``benchmarks/bench_gguf_dequant.py``; the
ratios are next to the choices in ``_DEQUANT`` and ``_QUANTIZE``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from llama_core.model_io.gguf_file import import_gguf

from . import gguf_kquants as K

Impl = Literal["auto", "torch", "numpy"]
CHUNK_ELEMENTS = 1 << 20  # output elements per chunk (4 MiB of fp32): temporaries of a few MiB, and few enough
# chunks that the per-op overhead is lost (1 << 18 measured 10-20% slower on the K-quants, 1 << 22 no faster)


def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float32))


def _f16(b: torch.Tensor, out: torch.Tensor) -> None:
    # torch quiets signalling NaNs when widening fp16, numpy keeps them: hand any NaNs to numpy (see _fix_nans)
    out.copy_(b.view(torch.float16))
    _fix_nans(out, b, np.float16)


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.bfloat16))  # exact: the 16 bits become the top half (NaN payloads kept, as gguf)


def _fix_nans(out: torch.Tensor, b: torch.Tensor, np_dtype: Any) -> None:
    """Recompute NaN outputs (a corrupt or exotic tensor; never real weights) with numpy's own conversion,
    so that even NaN payloads match gguf's numpy path."""
    if not out.amax().isnan():  # amax propagates NaN, and is ~15x faster here than isnan().any()
        return
    nan = out.isnan()
    if nan.any():
        src = b.view(-1).numpy().view(np_dtype).reshape(out.shape)
        out[nan] = torch.from_numpy(src[nan.numpy()].astype(np.float32))


# type name -> (torch block function, the implementation "auto" uses), with torch's speed over gguf's numpy:
# median of per-round ratios, 7 interleaved rounds, through dequantize() (same chunks and output) at a
# 4096 x 4096 weight / a 49152 x 576 embedding (49152 x 768 for K-quants), fp32 output, 2 torch threads, AMD
# EPYC (2 cores), benchmarks/results/gguf-dequant-amd-epyc.json: torch 2.4-3.6 GB/s of output, numpy
# 0.6-2.3 GB/s. Both include the page faults of a fresh output, which bound torch here. With more busy
# threads than cores (other processes), torch's threaded ops can stall 10-50x in bursts; numpy does not.
_DEQUANT: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], None], str]] = {
    "F32": (_f32, "torch"),  # 1.47x / 1.48x (two memcpys, the second on 2 threads, vs numpy's one)
    "F16": (_f16, "torch"),  # 2.37x / 2.42x
    "BF16": (_bf16, "torch"),  # 1.80x / 2.14x
    "Q8_0": (K.q8_0, "torch"),  # 1.84x / 2.44x
    "Q4_0": (K.q4_0, "torch"),  # 2.26x / 3.18x
    "Q4_1": (K.q4_1, "torch"),  # 2.34x / 3.31x
    "Q5_0": (K.q5_0, "torch"),  # 2.41x / 3.59x
    "Q5_1": (K.q5_1, "torch"),  # 2.42x / 3.70x
    "Q2_K": (K.q2_k, "torch"),  # 2.29x / 3.28x
    "Q3_K": (K.q3_k, "torch"),  # 2.48x / 3.81x
    "Q4_K": (K.q4_k, "torch"),  # 2.34x / 3.94x
    "Q5_K": (K.q5_k, "torch"),  # 2.54x / 4.20x
    "Q6_K": (K.q6_k, "torch"),  # 2.47x / 3.48x
}
# quantize: the same measurement of torch over gguf.quants.quantize (4096 x 4096 / 49152 x 576, fp32 input)
DEQUANTIZE_TYPES = tuple(_DEQUANT)  # the GGML type names ``dequantize`` reads
_QUANTIZE = {
    "F32": "torch",  # both hand back the float32 data itself
    "F16": "torch",  # 2.29x / 2.71x
    "BF16": "torch",  # 3.44x / 1.25x
    "Q8_0": "torch",  # 1.78x / 2.88x
}


def _qtype(ggml_type: Any, supported: tuple[str, ...] | dict, what: str) -> Any:
    gguf = import_gguf()
    types = gguf.GGMLQuantizationType
    try:  # the enum, its int value, or its name
        qtype = types[ggml_type] if isinstance(ggml_type, str) else types(ggml_type)
    except (KeyError, ValueError):
        qtype = None
    if qtype is None or qtype.name not in supported:
        name = qtype.name if qtype is not None else repr(ggml_type)
        raise ValueError(f"cannot {what} GGML type {name}: supported types are {', '.join(supported)}")
    return qtype


def _impl(impl: str, auto: str) -> str:
    if impl not in ("auto", "torch", "numpy"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'numpy', not {impl!r}")
    return auto if impl == "auto" else impl


def dequantize(data: np.ndarray, ggml_type: Any, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               impl: Impl = "auto") -> torch.Tensor:
    """The tensor of ``shape`` (PyTorch order) and ``dtype`` held by ``data``, the raw data of a GGUF tensor of
    type ``ggml_type`` (a ``gguf.GGMLQuantizationType``, its int or its name): typed or uint8, any shape with the right
    number of bytes, e.g. ``GGUFTensor.data``.

    The values equal ``gguf.quants.dequantize(data, ggml_type)`` bit for bit in float32 (NaN payloads
    included), cast to ``dtype`` at the end. The result owns its memory (F32 is copied too), so the memory
    map can be dropped. Work goes in chunks of ``CHUNK_ELEMENTS``: beyond the output, memory peaks at a
    chunk's temporaries. ``impl`` picks gguf's numpy code or the torch one ("auto": the faster here).
    A ValueError for an unsupported type, a size mismatch or a row length that is not whole blocks.
    """
    qtype = _qtype(ggml_type, _DEQUANT, "dequantize")
    block_fn, auto = _DEQUANT[qtype.name]
    impl = _impl(impl, auto)
    block_size, type_size = import_gguf().GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if shape and shape[-1] % block_size:
        raise ValueError(f"a {qtype.name} row holds whole blocks of {block_size} elements: shape {shape} does not")
    raw = np.asarray(data).reshape(-1).view(np.uint8)  # a view for a (contiguous) memory map
    n_blocks = numel // block_size
    if raw.size != n_blocks * type_size:
        raise ValueError(f"{qtype.name} data of shape {shape} takes {n_blocks * type_size} bytes, "
                         f"got {raw.size} (array shape {np.shape(data)}, {np.asarray(data).dtype})")

    out = torch.empty(numel, dtype=dtype)
    # chunks of whole rows where a row fits (numpy's grouping works on rows), else of blocks (a huge 1-D tensor)
    row = max(1, shape[-1] // block_size) if shape else 1  # blocks per row (an empty row: any)
    budget = max(1, CHUNK_ELEMENTS // block_size)
    chunk = budget // row * row if row <= budget else budget
    staging = torch.empty(min(chunk, n_blocks) * type_size, dtype=torch.uint8)  # reused for every chunk
    scratch = None if dtype == torch.float32 else torch.empty(min(chunk, n_blocks) * block_size)
    for start in range(0, n_blocks, chunk):
        n = min(chunk, n_blocks - start)
        dest = out[start * block_size:(start + n) * block_size]
        f32 = dest if scratch is None else scratch[:n * block_size]
        src = raw[start * type_size:(start + n) * type_size]
        if impl == "torch":
            # copy the bytes out of the (read-only) map into an owned buffer: torch cannot wrap a read-only
            # array without a warning, and the copy is a fraction of the output's size
            b = staging[:n * type_size]
            b.numpy()[:] = src
            block_fn(b.view(n, type_size), f32.view(n, block_size))
        else:
            rows = src.reshape(-1, row * type_size) if n % row == 0 else src.reshape(n, type_size)
            f32.numpy()[:] = import_gguf().quants.dequantize(rows, qtype).reshape(-1)
        if scratch is not None:
            dest.copy_(f32)
    return out.view(shape)


def quantize(tensor: torch.Tensor, ggml_type: Any, impl: Impl = "auto") -> np.ndarray:
    """``tensor`` as GGML type F32, F16, BF16 or Q8_0: exactly ``gguf.quants.quantize(tensor.float().numpy(),
    ggml_type)`` (bit for bit, NaNs included), ready for ``GGUFWriter.add_tensor(name, array,
    raw_dtype=ggml_type)``: float32/float16 arrays of the tensor's shape, or for BF16 and Q8_0 uint8 bytes of
    shape ``(*shape[:-1], bytes per row)``. F32 of a float32 CPU tensor shares its memory, as gguf's does.

    Q8_0 rounds as llama.cpp's ``quantize_row_q8_0_ref``: d = max|x| / 127 per block of 32, q = round(x / d)
    half away from zero (computed as x * (1/d)), d stored as fp16; rows must be whole blocks. ``impl`` as
    for ``dequantize``.
    """
    qtype = _qtype(ggml_type, _QUANTIZE, "quantize")
    impl = _impl(impl, _QUANTIZE[qtype.name])
    x = tensor.detach().cpu().float().contiguous()
    block = 32 if qtype.name == "Q8_0" else 1
    if qtype.name in ("BF16", "Q8_0") and (x.ndim == 0 or x.shape[-1] % block):  # gguf shapes bytes by rows
        raise ValueError(f"cannot quantize a tensor of shape {tuple(x.shape)} to {qtype.name}: "
                         f"{'rows must be whole blocks of 32' if x.ndim else 'it is a scalar'}")
    if impl == "numpy":
        return import_gguf().quants.quantize(x.numpy(), qtype)
    if qtype.name == "F32":
        return x.numpy()
    if qtype.name == "F16":
        h = x.half()  # round to nearest even, as numpy; NaN payloads go through numpy (torch quiets them)
        if x.numel() and x.amax().isnan():
            nan = x.isnan()
            h[nan] = torch.from_numpy(x[nan].numpy().astype(np.float16))
        return h.numpy()
    byte_shape = (*x.shape[:-1], x.shape[-1] * 2 if qtype.name == "BF16" else x.shape[-1] // 32 * 34)
    flat = x.view(-1)
    out = np.empty(byte_shape, dtype=np.uint8)
    dest = torch.from_numpy(out.reshape(-1))
    step = CHUNK_ELEMENTS  # a multiple of 32: chunks are whole blocks
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        if qtype.name == "BF16":
            dest[start * 2:(start + part.numel()) * 2] = _bf16_bits(part).view(torch.uint8)
        else:
            dest[start // 32 * 34:(start + part.numel()) // 32 * 34] = _q8_0_blocks(part.view(-1, 32)).view(-1)
    return out


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """gguf's (and ggml's ``ggml_compute_fp32_to_bf16``) rounding: NaNs keep sign and top payload bits and are
    made quiet; everything else rounds to nearest even on the bits. torch's own ``.bfloat16()`` turns every
    NaN into one canonical NaN, hence the bit arithmetic. int32 cannot overflow here: a NaN's low half is
    cleared before the bias (<= 0x8000) is added, and the largest other magnitude is inf (0x7f800000)."""
    n = x.view(torch.int32)
    if x.numel() and x.amax().isnan():  # rare: skip two passes over the data when there are no NaNs
        n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & -65536) | (64 << 16), n)
    rounded = (n >> 16).bitwise_and_(1).add_(0x7FFF).add_(n).bitwise_right_shift_(16)
    return rounded.to(torch.int16)  # the arithmetic shift's sign bits are cut off with the top half


def _q8_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` float32 -> ``(n, 34)`` Q8_0 bytes, gguf's operations in gguf's order."""
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1 / d)
    v = blocks * inv
    # gguf's np_roundf: half away from zero without the error of floor(|v| + 0.5) at 0.49999997
    a = v.abs()
    floor = a.floor()
    q = v.sign() * (floor + (2 * (a - floor)).floor())
    return torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
