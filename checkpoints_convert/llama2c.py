"""Reader for Karpathy's llama2.c ``.bin`` checkpoints (export.py versions 0, 1 and 2) as a CheckpointSource.

Layouts (little-endian, no alignment padding between fields):
  * v0 (legacy): 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a negative
    vocab_size flags a separate classifier), then fp32 tensors grouped by kind across layers: embeddings,
    attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, freq_cis real and imag
    (``[seq_len, head_size/2]`` each, unused: we recompute RoPE), then the classifier if not shared.
  * v1: 256-byte header (uint32 magic "ak42", int32 version, the 7 int32, uint8 shared flag, zero padding),
    then fp32: attention norms, ffn norms, final norm, embeddings, wq, wk, wv, wo, w1, w2, w3, [classifier].
  * v2 (Q8_0): the v1 header plus an int32 group size after the flag; fp32 norms as in v1, then per matrix
    (same order as v1) its int8 values followed by its fp32 group scales; value = q * scale[i // group].
    (The very first v2 export wrote all scales after all int8 blocks; runq.c and later export.py read and
    write them per tensor, which is what we read.)
llama2.c uses Meta's interleaved RoPE, so wq / wk rows are permuted into HF's rotate-half layout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_core.model_io.hf_checkpoint import check_finite
from llama_core.modeling.config import LlamaConfig

from .permute import interleaved_to_half
from .source import CheckpointSource, TensorSpec

logger = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# Stream order within a layer: the order of llama_core's state dict, so consumers see a familiar sequence.
_LAYER_ORDER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the fp32 values, or of the int8 values for a Q8_0 tensor
    scale_offset: int | None = None  # Q8_0 only: byte offset of its fp32 group scales
    rope_heads: int = 0  # > 0 for wq / wk: rows are permuted from interleaved with this many heads


def read_llama2c(path: str | os.PathLike, dtype: torch.dtype | None = None) -> CheckpointSource:
    """Describe a llama2.c checkpoint and stream its tensors (HF names, rotate-half layout) in ``dtype``.

    The header and the file size are checked here, before anything is streamed; the tensors are read from a
    memory map one at a time, so only the tensor being produced is held in memory.
    """
    path = Path(path)
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    actual = path.stat().st_size  # FileNotFoundError for a missing file, as open() would raise
    version, params, shared, group_size, start = _read_header(path, actual)
    where = f"{path} (llama2.c v{version}{': no ak42 magic, so read as the legacy format' if version == 0 else ''})"
    _validate(params, group_size, version, where)
    # The size the header implies, computed in closed form and checked against the file *before* the
    # per-tensor layout is listed: a corrupt header (n_layers = 2**31 - 1) must not build billions of entries.
    expected = _implied_size(version, params, shared, group_size, start, where)
    if actual != expected:
        detail = "truncated" if actual < expected else f"{actual - expected} trailing bytes"
        header = ", ".join(f"{k}={v}" for k, v in zip(_FIELDS, params, strict=True))
        raise ValueError(f"{where}: file is {actual} bytes but its header ({header}, shared classifier="
                         f"{shared}) implies {expected} bytes ({detail})")
    entries, laid_out = _layout(version, params, shared, group_size, start, where)
    assert laid_out == expected, (laid_out, expected)  # the closed form and the layout describe one format
    if version == 2:
        # A layout check before streaming: where the first tensor's scales should be, an early export.py
        # (which wrote every scale after every int8 block, same total size) has int8 values instead.
        first = next(e for e in entries if e.scale_offset is not None)
        count = math.prod(first.shape) // group_size
        with open(path, "rb") as f:
            f.seek(first.scale_offset)
            _scales(bytearray(f.read(4 * count)), 0, count, first.name, where)
    entries.sort(key=_hf_order)

    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = params
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2,
                         dtype=str(dtype).removeprefix("torch."))
    specs = {e.name: TensorSpec(e.shape, dtype) for e in entries}
    logger.info("llama2.c v%d checkpoint %s: %s, shared classifier %s", version, path,
                dict(zip(_FIELDS, params, strict=True)), shared)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        # Re-checked per call: the file may have been replaced since it was described.
        if path.stat().st_size != expected:
            raise ValueError(f"{where}: file changed size since it was read ({path.stat().st_size} != {expected})")
        # ACCESS_COPY (private, copy-on-write) gives torch.frombuffer a writable buffer without ever
        # writing to the file; nothing writes to the views anyway.
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for entry in entries:
                w = _materialise(mapped, entry, dtype, group_size, where)
                check_finite(entry.name, w, where)
                yield entry.name, w
        finally:
            # BufferError: a view is still alive somewhere; the map is then released when it is collected.
            with contextlib.suppress(BufferError):
                mapped.close()

    return CheckpointSource(config=config, specs=specs, stream=stream, description=f"llama2.c v{version} {path}")


def _read_header(path: Path, size: int) -> tuple[int, list[int], bool, int, int]:
    """(version, the 7 params with vocab_size made positive, shared classifier, group size, data offset)."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise ValueError(f"{path}: {size} bytes is too small for a llama2.c v1/v2 header "
                             f"({V1_HEADER_BYTES} bytes)")
        (version,) = struct.unpack_from("<i", head, 4)
        if version not in (1, 2):
            raise ValueError(f"{path}: unknown llama2.c version {version} (supported: 0, 1, 2)")
        params = list(struct.unpack_from("<7i", head, 8))
        flag = head[36]
        if flag not in (0, 1):
            raise ValueError(f"{path}: shared-classifier flag is {flag}, expected 0 or 1 (corrupt header?)")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        return version, params, bool(flag), group_size, V1_HEADER_BYTES
    # No magic: the legacy format, whose header is just the 7 ints; the sign of vocab_size is the flag.
    if len(head) < V0_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too small for a llama2.c header (no ak42 magic, and a legacy "
                         f"v0 header needs {V0_HEADER_BYTES} bytes)")
    params = list(struct.unpack_from("<7i", head))
    shared = params[5] > 0
    params[5] = abs(params[5])
    return 0, params, shared, 0, V0_HEADER_BYTES


def _validate(params: list[int], group_size: int, version: int, where: str) -> None:
    bad = [f"{k}={v}" for k, v in zip(_FIELDS, params, strict=True) if v <= 0]
    if bad:
        raise ValueError(f"{where}: header fields must be positive, got {', '.join(bad)}")
    dim, _, _, n_heads, n_kv_heads, _, _ = params
    if dim % n_heads:
        raise ValueError(f"{where}: dim={dim} is not a multiple of n_heads={n_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{where}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if (dim // n_heads) % 2:
        raise ValueError(f"{where}: head size {dim // n_heads} is odd; rotary embeddings need it even")
    if version == 2 and group_size <= 0:
        raise ValueError(f"{where}: quantisation group size must be positive, got {group_size}")


def _implied_size(version: int, params: list[int], shared: bool, group_size: int, start: int, where: str) -> int:
    """The file size in bytes that a header implies (the sum that ``_layout`` walks, without listing tensors)."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = params
    kv_dim = n_kv_heads * (dim // n_heads)
    norms = 2 * n_layers * dim + dim  # attention and ffn norm per layer, final norm: always fp32
    per_layer = [dim * dim, kv_dim * dim, kv_dim * dim, dim * dim, hidden * dim, dim * hidden, hidden * dim]
    matrices = [vocab * dim] * (1 if shared else 2)  # embeddings [, classifier]
    if version == 2:
        names = ["model.embed_tokens.weight", *(f"model.layers.0.{k}.weight" for k in _LAYER_ORDER[:7])]
        for name, n in zip(names, matrices[:1] + [per_layer[i] for i in (0, 1, 2, 3, 4, 6, 5)], strict=True):
            if n % group_size:
                raise ValueError(f"{where}: {name} has {n} values, not a multiple of the group size {group_size}")
        q8 = sum(n + 4 * (n // group_size) for n in matrices) + n_layers * sum(
            n + 4 * (n // group_size) for n in per_layer)
        return start + 4 * norms + q8
    size = start + 4 * (norms + sum(matrices) + n_layers * sum(per_layer))
    return size + (4 * seq_len * (dim // n_heads) if version == 0 else 0)  # v0 also stores freq_cis


def _layout(version: int, params: list[int], shared: bool, group_size: int, start: int,
            where: str) -> tuple[list[_Entry], int]:
    """Every tensor's place in the file, in file order, and the file size that the header implies."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = params
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size

    def per_layer(key: str, shape: tuple[int, ...], rope_heads: int = 0) -> list[tuple[str, tuple, int]]:
        return [(f"model.layers.{i}.{key}.weight", shape, rope_heads) for i in range(n_layers)]

    emb = [("model.embed_tokens.weight", (vocab, dim), 0)]
    att_norm, ffn_norm = per_layer("input_layernorm", (dim,)), per_layer("post_attention_layernorm", (dim,))
    final = [("model.norm.weight", (dim,), 0)]
    matrices = [*per_layer("self_attn.q_proj", (dim, dim), n_heads),
                *per_layer("self_attn.k_proj", (kv_dim, dim), n_kv_heads),
                *per_layer("self_attn.v_proj", (kv_dim, dim)), *per_layer("self_attn.o_proj", (dim, dim))]
    ffn = [*per_layer("mlp.gate_proj", (hidden, dim)), *per_layer("mlp.down_proj", (dim, hidden)),
           *per_layer("mlp.up_proj", (hidden, dim))]  # llama2.c w1, w2, w3
    head = [] if shared else [("lm_head.weight", (vocab, dim), 0)]

    entries: list[_Entry] = []
    pos = start
    if version == 0:
        fp32 = emb + att_norm + matrices + ffn_norm + ffn + final
    else:  # v2 keeps only the norms in fp32
        fp32 = att_norm + ffn_norm + final + (emb + matrices + ffn + head if version == 1 else [])
    for name, shape, rope_heads in fp32:
        entries.append(_Entry(name, shape, pos, None, rope_heads))
        pos += 4 * math.prod(shape)
    if version == 0:
        pos += 4 * seq_len * head_size  # freq_cis real + imag, [seq_len, head_size / 2] each: skipped
        for name, shape, rope_heads in head:
            entries.append(_Entry(name, shape, pos, None, rope_heads))
            pos += 4 * math.prod(shape)
    elif version == 2:
        for name, shape, rope_heads in emb + matrices + ffn + head:
            n = math.prod(shape)
            if n % group_size:
                raise ValueError(f"{where}: {name} has {n} values, not a multiple of the group size {group_size}")
            entries.append(_Entry(name, shape, pos, pos + n, rope_heads))
            pos += n + 4 * (n // group_size)
    return entries, pos


def _hf_order(entry: _Entry) -> tuple[int, int, int]:
    parts = entry.name.split(".")
    if parts[1] == "layers":
        return 1, int(parts[2]), _LAYER_ORDER.index(".".join(parts[3:-1]))
    return {"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(entry.name, 3), 0, 0


def _scales(buffer: mmap.mmap | bytearray, offset: int, count: int, name: str, where: str) -> torch.Tensor:
    """A tensor's Q8_0 group scales, checked: max|w| / 127 is never negative, NaN or infinite."""
    # They follow an int8 block, so may not be 4-aligned: copy the bytes (1/group_size of the tensor) rather
    # than view them as float32 in place.
    scales = torch.frombuffer(buffer, dtype=torch.uint8, count=4 * count, offset=offset).clone().view(torch.float32)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError(f"{where}: {name} has negative or non-finite Q8_0 scales: the file is corrupt, or comes "
                         "from an early export.py that wrote all scales after all the int8 values")
    return scales


def _materialise(mapped: mmap.mmap, entry: _Entry, dtype: torch.dtype, group_size: int, where: str) -> torch.Tensor:
    """One tensor, owning its memory (never a view of the map), in HF layout and ``dtype``."""
    n = math.prod(entry.shape)
    raw = None
    if entry.scale_offset is None:
        raw = torch.frombuffer(mapped, dtype=torch.float32, count=n, offset=entry.offset)
        w = raw.view(entry.shape).to(dtype)  # still a view of the map when dtype is float32
    else:
        q = torch.frombuffer(mapped, dtype=torch.int8, count=n, offset=entry.offset)
        scales = _scales(mapped, entry.scale_offset, n // group_size, entry.name, where)
        w = q.to(torch.float32)  # the one full-size copy; scaled in place
        w.view(-1, group_size).mul_(scales[:, None])
        w = w.view(entry.shape).to(dtype)
    if entry.rope_heads:
        w = interleaved_to_half(w, entry.rope_heads)
    if raw is not None and w.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        w = w.clone()  # nothing copied it yet; a view would pin the map and alias the file
    return w
