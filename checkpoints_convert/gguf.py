"""GGUF models (llama.cpp's format) of architecture ``llama`` as a CheckpointSource: HF names, HF layout.

What llama.cpp's converter does to a Llama, undone here:
  * tensor names: ``token_embd`` / ``blk.N.attn_q`` / ``output`` ... -> ``model.embed_tokens`` /
    ``model.layers.N.self_attn.q_proj`` / ``lm_head`` ... (no ``output.weight``: tied embeddings);
  * the q/k rows are permuted from HF's rotate-half layout into Meta's interleaved one (llama.cpp rotates
    adjacent pairs), so they are permuted back (``permute.interleaved_to_half``, per head; GQA for k);
  * hyper-parameters live in ``llama.*`` metadata; Llama 3.1-style rope scaling is stored as per-frequency
    divisors in a ``rope_freqs`` tensor, from which the ``llama3`` rope_scaling is recovered exactly (or the
    file is refused);
  * weights are stored in block-quantised types, dequantised (``gguf_quants``) one tensor at a time.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llama_core.model_io.dtypes import parse_dtype
from llama_core.model_io.gguf_file import GGUFFile, GGUFTensor
from llama_core.model_io.hf_checkpoint import check_finite
from llama_core.modeling.config import LlamaConfig

from .gguf_quants import DEQUANTIZE_TYPES, dequantize
from .gguf_rope import llama3_scaling_from_rope_freqs
from .permute import interleaved_to_half
from .source import CheckpointSource, TensorSpec

logger = logging.getLogger(__name__)

ARCHITECTURE = "llama"
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
# llama.cpp's name inside ``blk.N.`` -> HF's inside ``model.layers.N.``
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style scaling: not a model tensor, it becomes the config's
# llama.cpp's general.file_type for unquantised files -> the dtype the model was stored in.
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it is not one of a Llama's."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    return None


def gguf_config(f: GGUFFile) -> LlamaConfig:
    """The LlamaConfig a ``llama`` GGUF describes (a ValueError naming the file and key otherwise)."""
    arch = f.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{f.path}: architecture {arch!r} is not supported; llama_core reads {ARCHITECTURE!r}")

    def key(name: str, default: Any = ...) -> Any:
        return f.get(f"{arch}.{name}") if default is ... else f.get(f"{arch}.{name}", default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads if heads else 0))
    value_dim = int(key("attention.value_length", head_dim))
    rotary = int(key("rope.dimension_count", head_dim))
    if value_dim != head_dim or rotary != head_dim:
        raise ValueError(f"{f.path}: key length {head_dim}, value length {value_dim} and rope dimension count "
                         f"{rotary} differ; llama_core's Llama rotates whole heads of one size")
    tensors = {t.name: t for t in f.tensors}
    tokens = f.get("tokenizer.ggml.tokens", None)
    embedding = tensors.get("token_embd.weight")
    vocab = len(tokens) if tokens else int(key("vocab_size", embedding.shape[0] if embedding else 0))
    theta = float(key("rope.freq_base", 10000.0))
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=_float32_value(key("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=_rope_scaling(f, key, tensors, head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id", None), eos_token_id=f.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=f.get("tokenizer.ggml.padding_token_id", None),
        dtype=_FILE_TYPE_DTYPES.get(f.get("general.file_type", None)),
    )
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f.path}: its metadata does not describe a valid Llama: {e}") from e


def _float32_value(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 arrives as 9.99999974738e-06. The shortest decimal that is the
    # same float32 is what the model's config said.
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _rope_scaling(f: GGUFFile, key: Any, tensors: dict[str, GGUFTensor], head_dim: int,
                  theta: float) -> dict[str, Any] | None:
    kind = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", None)
    if kind is None and key("rope.scale_linear", None) is not None:  # older files
        kind, factor = "linear", key("rope.scale_linear")
    if ROPE_FREQS in tensors:
        if kind not in (None, "none"):
            raise ValueError(f"{f.path}: has both rope scaling type {kind!r} and a {ROPE_FREQS} tensor")
        freqs = dequantize(tensors[ROPE_FREQS].read(), tensors[ROPE_FREQS].ggml_type, tensors[ROPE_FREQS].shape)
        return llama3_scaling_from_rope_freqs(freqs, head_dim, theta, key("rope.scaling.original_context_length",
                                                                          None), where=str(f.path))
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float32_value(factor),
                   "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        for name in ("beta_fast", "beta_slow"):
            value = key(f"rope.scaling.yarn_{name}", None)
            if value is not None:
                scaling[name] = _float32_value(value)
        return scaling
    raise ValueError(f"{f.path}: rope scaling type {kind!r} is not supported (none, linear, yarn, or a "
                     f"{ROPE_FREQS} tensor for Llama 3 scaling)")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of ``config``'s causal LM (lm_head only when untied)."""
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
             "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
             "mlp.down_proj.weight": (h, inter)}
    if config.attention_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.bias": (h,)}
    if config.mlp_bias:
        layer |= {"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def _check_block_count(f: GGUFFile, block_count: int) -> None:
    """The metadata's layer count against the layers the file has tensors for, before anything is sized by
    it (a crafted ``block_count`` of 2**31 would otherwise list billions of expected names)."""
    layers = {int(m.group(1)) for t in f.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if block_count != len(layers):
        raise ValueError(f"{f.path}: llama.block_count is {block_count} but the file holds tensors of "
                         f"{len(layers)} layers")


def read_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None) -> CheckpointSource:
    """A ``llama`` GGUF as HF-named tensors in ``dtype`` (default: the file's own float type, float32 for a
    quantised file). Metadata, names and shapes are all checked here, before any tensor is read; tensors are
    then read and dequantised one at a time."""
    f = GGUFFile(path)
    config = gguf_config(f)
    _check_block_count(f, config.num_hidden_layers)
    dtype = parse_dtype(dtype or config.dtype or "float32")
    config = config.replace(dtype=str(dtype).removeprefix("torch."))
    expected = expected_shapes(config)
    names: dict[str, GGUFTensor] = {}
    for t in f.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise ValueError(f"{f.path}: tensor {t.name} is not part of a Llama with this metadata "
                             f"({config.num_hidden_layers} layers)")
        if t.ggml_type.name not in DEQUANTIZE_TYPES:
            raise ValueError(f"{f.path}: tensor {t.name} has GGML type {t.ggml_type.name}, which llama_core does not "
                             f"dequantise (supported: {', '.join(DEQUANTIZE_TYPES)})")
        if t.shape != expected[name]:
            raise ValueError(f"{f.path}: tensor {t.name} has shape {list(t.shape)} but the metadata implies "
                             f"{list(expected[name])} (hidden {config.hidden_size}, heads {config.num_attention_heads}"
                             f"/{config.num_key_value_heads}, head_dim {config.head_dim}, feed-forward "
                             f"{config.intermediate_size}, vocab {config.vocab_size})")
        names[name] = t
    missing = [n for n in expected if n not in names]
    if missing:
        raise ValueError(f"{f.path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}")
    rope_heads = {}
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            for kind in ("weight", "bias"):
                rope_heads[f"model.layers.{i}.self_attn.{proj}.{kind}"] = heads
    specs = {name: TensorSpec(t.shape, dtype) for name, t in names.items()}
    total = sum(math.prod(t.shape) for t in names.values())
    logger.info("%s: %d tensors, %.1fM parameters, types %s", f.path, len(names), total / 1e6,
                sorted({t.ggml_type.name for t in names.values()}))
    del f  # the stream needs only the tensor descriptors: the vocabulary's metadata can go

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in names.items():
            try:
                w = dequantize(t.read(), t.ggml_type, t.shape, dtype)
            except ValueError as e:
                raise ValueError(f"{t.path}: tensor {t.name} ({t.ggml_type.name}): {e}") from e
            if name in rope_heads:
                w = interleaved_to_half(w, rope_heads[name])
            check_finite(name, w, t.path)
            yield name, w

    return CheckpointSource(config, specs, stream, str(Path(path)))
