"""Writing a CheckpointSource as a GGUF file that llama.cpp runs: the reverse of ``gguf.read_gguf``.

Layout as llama.cpp's own converter writes a Llama: llama.cpp's tensor names, q/k rows permuted into the
interleaved layout, ``llama.*`` hyper-parameters, Llama 3 rope scaling as a ``rope_freqs`` tensor, 1-D
tensors (norms, biases) always F32, and the matrices in the chosen type (``f32``, ``f16``, ``bf16`` or
``q8_0``; a matrix whose rows are not whole Q8_0 blocks falls back to F16, as llama.cpp's does).

The file is written through the ``gguf`` package's writer in its streaming form: every tensor's header
first, then the data one tensor at a time, so memory holds one tensor; into a temporary file that
replaces the output only when complete.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llama_core.model_io.atomic import atomic_file
from llama_core.model_io.gguf_file import import_gguf
from llama_core.modeling.config import LlamaConfig

from .gguf import ARCHITECTURE, GLOBAL_TENSORS, LAYER_TENSORS, ROPE_FREQS
from .gguf_quants import quantize
from .gguf_rope import rope_freqs_for
from .permute import half_to_interleaved
from .source import CheckpointSource

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_HF_TO_GGUF = {hf: gguf for gguf, hf in GLOBAL_TENSORS.items()}
_HF_LAYER_TO_GGUF = {hf: gguf for gguf, hf in LAYER_TENSORS.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{_HF_LAYER_TO_GGUF[parts[3]]}"
    raise ValueError(f"tensor {hf_name} has no place in a llama.cpp Llama")


def _tensor_type(gguf: Any, outtype: str, shape: tuple[int, ...]) -> Any:
    t = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return t.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[t.Q8_0][0]
        return t.Q8_0 if shape[-1] % block == 0 else t.F16
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16}[outtype]


def _file_type(gguf: Any, outtype: str) -> int:
    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}[outtype]


def _add_hyperparameters(writer: Any, gguf: Any, config: LlamaConfig, outtype: str) -> torch.Tensor | None:
    """The ``llama.*`` keys; returns the ``rope_freqs`` tensor for Llama 3 scaling (else None)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf, outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling, kind = config.rope_scaling, config.rope_type
    if kind == "llama3":
        return rope_freqs_for(config.head_dim, config.rope_theta, scaling)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling.get("original_max_position_embeddings",
                                                         config.max_position_embeddings))
        for name in ("beta_fast", "beta_slow"):
            if scaling.get(name) is not None:
                getattr(writer, f"add_rope_scaling_yarn_{name}")(scaling[name])
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} has no GGUF form (llama.cpp knows none, linear, yarn and llama3)")
    return None


def write_gguf(source: CheckpointSource, output: str | Path, outtype: str = "f32",
               add_metadata: Callable[[Any], None] | None = None, progress: bool = True) -> Path:
    """Write ``source`` to the GGUF file ``output`` (atomically). ``add_metadata(writer)`` adds more
    key/values (the tokenizer, the chat template, a name) to the ``gguf.GGUFWriter`` before anything is
    written."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    gguf = import_gguf()
    config = source.config
    if config.hidden_act != "silu":
        raise ValueError(f"llama.cpp's Llama uses SiLU; this model has hidden_act={config.hidden_act!r}")
    plan: list[tuple[str, str, tuple[int, ...], Any]] = []  # (HF name, GGUF name, shape, GGML type)
    for name, spec in source.specs.items():
        plan.append((name, gguf_name(name), tuple(spec.shape), _tensor_type(gguf, outtype, tuple(spec.shape))))
    rope_heads = {}
    for i in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            for kind in ("weight", "bias"):
                rope_heads[f"model.layers.{i}.self_attn.{proj}.{kind}"] = heads

    with atomic_file(output) as tmp, _short_writes_as_no_space(tmp):
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        rope_freqs = _add_hyperparameters(writer, gguf, config, outtype)
        if add_metadata is not None:
            add_metadata(writer)
        extra = [(ROPE_FREQS, rope_freqs)] if rope_freqs is not None else []
        for gname, tensor in extra:
            writer.add_tensor_info(gname, tuple(tensor.shape), tensor.numpy().dtype, tensor.numel() * 4,
                                   raw_dtype=gguf.GGMLQuantizationType.F32)
        for _, gname, shape, ggml_type in plan:
            block, size = gguf.GGML_QUANT_SIZES[ggml_type]
            writer.add_tensor_info(gname, shape, torch.empty(0).numpy().dtype, math.prod(shape) // block * size,
                                   raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in extra:
            writer.write_tensor_data(tensor.numpy())
        types = {name: ggml_type for name, _, _, ggml_type in plan}
        with tqdm(total=source.total_bytes(), unit="B", unit_scale=True, desc="writing",
                  disable=not progress or None) as bar:
            for name, tensor in source.stream():
                if name not in types:
                    raise ValueError(f"{source.description}: the stream yielded {name}, which its specs do not list")
                if name in rope_heads:
                    tensor = half_to_interleaved(tensor, rope_heads[name])
                writer.write_tensor_data(quantize(tensor, types.pop(name)))
                bar.update(tensor.numel() * tensor.element_size())
        if types:
            raise ValueError(f"{source.description}: the stream ended before {', '.join(list(types)[:5])}")
        writer.close()
    return Path(output)


_SHORT_WRITE = re.compile(r"^(\d+) requested and \d+ written$")


@contextmanager
def _short_writes_as_no_space(path: Path) -> Iterator[None]:
    """The gguf writer stores tensors with numpy's ``tofile``, which reports a failed write as "N requested
    and M written" with no errno. With less than N bytes free on the file system that is a full disk:
    raise it as ENOSPC, which ``atomic_file`` reports with the output's path."""
    try:
        yield
    except OSError as e:
        m = _SHORT_WRITE.match(str(e))
        if e.errno is None and m is not None:
            fs = os.statvfs(path.parent)
            if fs.f_bavail * fs.f_frsize < int(m.group(1)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise
