"""from_pretrained: stream a checkpoint into a model built on the meta device.

Hugging Face directories and hub ids are read by ``hf_checkpoint``; Meta checkpoint directories and
llama2.c files go through checkpoints_convert's readers, which yield the same HF-named tensors.

Memory: the model is built on ``meta`` (no storage), safetensors are memory-mapped and each tensor is
assigned into the model as it is (``load_state_dict(assign=True)``), so loading in the stored dtype on the
CPU holds one copy of the weights. Every key, shape and dtype is checked against the model from the file
headers *before* any weight is read, so a bad checkpoint fails fast and never yields a half-loaded model.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..modeling.config import LlamaConfig
from ..quant import Int8Config, Int8Linear, replace_linears
from .dtypes import parse_dtype
from .gguf_file import find_gguf
from .hf_checkpoint import (
    NonFiniteWeightWarning,
    TensorInfo,
    TensorStream,
    check_finite,
    open_hf_checkpoint,
    report_non_finite,
    safetensors_non_finite,
)
from .hub import resolve_checkpoint
from .placement import device_for, resolve_device_map

logger = logging.getLogger(__name__)

# Checkpoint keys that older exports carry and that hold nothing we need (recomputed from the config).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------- sizes, before anything is built
def check_config_against_tensors(config: LlamaConfig, infos: dict[str, TensorInfo], where: object) -> None:
    """Raise ValueError unless the config's counts are what the checkpoint's tensor names and header shapes
    say: as many layers as ``layers.N`` indices (0..N-1), and vocabulary, hidden, head and feed-forward sizes
    equal to the first layer's shapes. Runs before the model is built, so an absurd config.json (a million
    layers) fails in milliseconds instead of building modules for an hour."""
    indices = {int(m.group(1)) for name in infos if (m := _LAYER_INDEX.search(name))}
    n = config.num_hidden_layers
    if indices != set(range(n)):
        found = f"{len(indices)} layers (indices {min(indices)}..{max(indices)})" if indices else "no layers"
        raise ValueError(f"{where}: config num_hidden_layers={n}, but the checkpoint's tensors hold {found}")
    c = config
    expected = {"embed_tokens.weight": ((c.vocab_size, c.hidden_size), "vocab_size, hidden_size"),
                "layers.0.self_attn.q_proj.weight": ((c.num_attention_heads * c.head_dim, c.hidden_size),
                                                     "num_attention_heads * head_dim, hidden_size"),
                "layers.0.self_attn.k_proj.weight": ((c.num_key_value_heads * c.head_dim, c.hidden_size),
                                                     "num_key_value_heads * head_dim, hidden_size"),
                "layers.0.mlp.gate_proj.weight": ((c.intermediate_size, c.hidden_size),
                                                  "intermediate_size, hidden_size")}
    for suffix, (shape, fields) in expected.items():
        name = next((k for k in infos if k == suffix or k.endswith("." + suffix)), None)
        if name is not None and tuple(infos[name].shape) != shape:
            raise ValueError(f"{where}: shape mismatch for {name}: checkpoint {list(infos[name].shape)}, but the "
                             f"config ({fields}) implies {list(shape)}")


# ---------------------------------------------------------------------- matching names to the model
def _rename(infos: dict[str, TensorInfo], model: torch.nn.Module) -> dict[str, str]:
    """Model key -> checkpoint key, mapping the checkpoint's base prefix ("model.", "transformer.", "")
    onto the model's, so e.g. a causal-LM checkpoint loads into LlamaModel or a task head."""
    ckpt_prefix = next((k[: -len("embed_tokens.weight")] for k in infos if k.endswith("embed_tokens.weight")), None)
    model_prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    mapping = {}
    for key in infos:
        new = key
        if ckpt_prefix is not None and key.startswith(ckpt_prefix) and not _is_head_key(key, ckpt_prefix):
            new = model_prefix + key[len(ckpt_prefix):]
        mapping[new] = key
    return mapping


def _is_head_key(key: str, ckpt_prefix: str) -> bool:
    # With a prefix-less (bare decoder) checkpoint every key "starts with" the prefix; heads are not renamed.
    return ckpt_prefix == "" and key.split(".")[0] in ("lm_head", "score", "qa_outputs")


def _check(model: torch.nn.Module, infos: dict[str, TensorInfo], names: dict[str, str]) -> tuple[set, bool]:
    """Raise one ValueError listing every missing, unexpected, misshapen or non-float tensor.

    Returns the head keys to initialise (absent from a base checkpoint) and whether lm_head is to be tied
    to the embedding (tied config, or no lm_head in the checkpoint).
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    # An int8 head (quantised while loading, or stored so) of a tied model is its own tensor when the
    # checkpoint holds it, else quantised from the embedding.
    int8_head = type(model.get_output_embeddings()) is Int8Linear
    tied = (model.config.tie_word_embeddings and "lm_head.weight" in expected
            and not (int8_head and "lm_head.weight" in names))
    optional = set(model._init_if_missing)
    if "lm_head.weight" in expected:
        optional.add("lm_head.weight")  # absent -> tied to the embedding
        if int8_head:
            optional.add("lm_head.weight_scale")
    problems = []
    missing = sorted(k for k in expected if k not in names and k not in optional)
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    unexpected = sorted(k for k in names if k not in expected and not k.endswith(IGNORED_KEY_SUFFIXES)
                        and k not in model._ignore_if_unexpected)
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, ckpt_key in names.items():
        info = infos[ckpt_key]
        if key in expected and info.shape != expected[key][0] and not (tied and key == "lm_head.weight"):
            problems.append(f"shape mismatch for {ckpt_key} in {info.file.name}: checkpoint {list(info.shape)}, "
                            f"model {list(expected[key][0])}")
        elif key in expected and expected[key][1].is_floating_point and not info.dtype.is_floating_point:
            problems.append(f"{ckpt_key} in {info.file.name} has dtype {info.dtype}; expected a floating-point tensor")
        elif key in expected and not expected[key][1].is_floating_point and info.dtype != expected[key][1]:
            problems.append(f"{ckpt_key} in {info.file.name} has dtype {info.dtype}; expected {expected[key][1]}")
    if problems:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    to_init = {k for k in model._init_if_missing if k not in names}
    tie = "lm_head.weight" in expected and (tied or "lm_head.weight" not in names)
    return to_init, tie


# ---------------------------------------------------------------------- any supported checkpoint
def open_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None, cache_dir: Any = None,
                    token: Any = None, gguf_file: str | None = None
                    ) -> tuple[LlamaConfig, dict[str, TensorInfo], TensorStream]:
    """Config, tensor headers and a one-pass tensor stream for an HF directory or hub id, a GGUF file
    (``find_gguf``: a ``.gguf``, a directory holding one, or ``gguf_file`` in a directory or hub repo), a Meta
    checkpoint directory (params.json + consolidated.*.pth) or a llama2.c ``.bin`` file; the last three are
    converted on the fly by checkpoints_convert (HF names, rotate-half layout)."""
    path = Path(path_or_hub_id).expanduser()
    source = None
    gguf = find_gguf(path_or_hub_id, gguf_file, revision, cache_dir, token)
    # The other formats' readers live in checkpoints_convert, whose converters build on this package: each
    # is reached through a documented lazy import, made only when such a checkpoint is opened.
    if gguf is not None:
        from checkpoints_convert.gguf import read_gguf  # lazy import (see above)

        path, source = gguf, read_gguf(gguf)
    elif path.is_file():
        from checkpoints_convert.llama2c import read_llama2c  # lazy import (see above)

        source = read_llama2c(path)
    elif path.is_dir() and not (path / "config.json").exists():
        from checkpoints_convert.meta import is_meta_checkpoint, read_meta  # lazy import (see above)

        if is_meta_checkpoint(path):
            source = read_meta(path)
    if source is not None:
        infos = {name: TensorInfo(path, spec.shape, spec.dtype) for name, spec in source.specs.items()}
        return source.config, infos, source.stream

    directory = resolve_checkpoint(path_or_hub_id, revision=revision, cache_dir=cache_dir, token=token)
    return open_hf_checkpoint(directory)


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter ``key`` (no copy), as load_state_dict(assign=True) does."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:  # e.g. an Int8Linear's int8 weight and its scales
        module._buffers[leaf] = tensor
        return
    old = module._parameters[leaf]
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)


# ---------------------------------------------------------------------- entry point
def load_pretrained(cls: type, path_or_hub_id: str | os.PathLike, *, dtype: Any = None, device: Any = "cpu",
                    attn_implementation: str | None = None, device_map: str | dict | None = None,
                    max_memory: dict | None = None, revision: str | None = None, cache_dir: Any = None,
                    token: Any = None, config: LlamaConfig | None = None, torch_dtype: Any = None,
                    quantize: Any = None, load_in_8bit: bool = False, gguf_file: str | None = None,
                    check_finite: bool | None = None, **config_overrides: Any):
    """Build ``cls`` from a checkpoint directory or hub id, a GGUF file (or ``gguf_file`` inside a directory
    or hub repository), a Meta checkpoint directory or a llama2.c ``.bin`` file.

    ``dtype``: None keeps torch's default float dtype (fp32), "auto" follows config.json, then the stored
    dtype; or a torch.dtype / name. ``torch_dtype`` is accepted as an alias. ``device_map`` ("auto" or a
    dict of module prefix -> device, with ``max_memory``) splits the model across devices. Extra keyword
    arguments override config fields (e.g. ``num_labels=3`` for a classification head).

    ``quantize`` ("int8", "int8-weight-only", a dict or a ``quant.Int8Config``; ``load_in_8bit=True`` is
    "int8") quantises the linear layers while loading: each weight is cast to ``dtype``, quantised on its
    device and freed before the next one is read, so the full-precision model never exists in memory.
    A checkpoint saved quantised (config.json ``quantization_config``) loads as int8 without it.

    ``check_finite``: a weight holding NaN or infinity gives a RuntimeWarning naming it (None, the default),
    a NonFiniteWeightError (True), or is not looked for (False).
    """
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("pass dtype or its alias torch_dtype, not both")
        dtype = torch_dtype
    found_config, infos, stream = open_checkpoint(path_or_hub_id, revision, cache_dir, token, gguf_file)
    config = config or found_config
    if config_overrides:
        config = config.replace(**config_overrides)
    if attn_implementation is not None:
        config = config.replace(attn_implementation=attn_implementation)

    if dtype == "auto":
        stored = next((i.dtype for i in infos.values() if i.dtype.is_floating_point), torch.float32)
        target = parse_dtype(config.dtype) if config.dtype else stored
    else:
        target = parse_dtype(dtype) if dtype is not None else torch.get_default_dtype()

    check_config_against_tensors(config, infos, path_or_hub_id)
    with torch.device("meta"):
        model = cls(config, init=False)
    names = _rename(infos, model)
    quant = _quantization(config, quantize, load_in_8bit)
    stored_int8 = bool(config.quantization_config)
    if stored_int8:  # the model takes the checkpoint's int8 layout before checking it
        replace_linears(model, quant)
    to_init, tie = _check(model, infos, names)
    # Full-precision weights to quantise as they stream in (model key -> Int8Linear).
    quantize_on_load = {} if quant is None or stored_int8 else {
        f"{name}.weight": model.get_submodule(name) for name in replace_linears(model, quant)}
    placement = resolve_device_map(model, device_map, device, target, max_memory)
    if tie and not config.tie_word_embeddings:
        logger.info("%s has no lm_head.weight: tying it to the input embedding", path_or_hub_id)
        model.config.tie_word_embeddings = True

    expected = model.state_dict(keep_vars=True)
    buffer_keys = {name for name, _ in model.named_buffers()} & expected.keys()
    wanted = {ckpt_key: key for key, ckpt_key in names.items()
              if key in expected and not (tie and key == "lm_head.weight")}
    for ckpt_key, tensor in _checked(stream, infos, check_finite, path_or_hub_id):  # one at a time, into the model
        key = wanted.get(ckpt_key)
        if key in quantize_on_load:
            quantize_on_load[key].set_weight(_place(tensor, target, device_for(key, placement)))
        elif key is not None:
            dtype = tensor.dtype if key in buffer_keys else target  # buffers keep theirs: int8 weights, fp32 scales
            placed = _place(tensor, dtype, device_for(key, placement))
            if quantize_on_load and placed.data_ptr() == tensor.data_ptr():
                # An own copy, so the shard's mapping (whose big weights were quantised and dropped) can go.
                placed = placed.clone()
            _assign(model, key, placed)

    for module_name in sorted({key.rsplit(".", 1)[0] for key in to_init}):
        keys = ", ".join(sorted(k for k in to_init if k.startswith(module_name + ".")))
        logger.warning("%s: %s not in the checkpoint, newly initialised; train before use", cls.__name__, keys)
        module = model.get_submodule(module_name)
        module.to_empty(device=device_for(module_name, placement), recurse=False)
        module.to(target)
        model._init_module(module)
    if tie:
        head = model.get_output_embeddings()
        if type(head) is Int8Linear:  # tied, quantised: an int8 copy of the (loaded) embedding
            head.set_weight(model.get_input_embeddings().weight.detach())
        else:
            model.tie_weights()
    base = model.base_model
    base.rotary_emb.reset_buffers(base.embed_tokens.weight.device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a bug guard: every tensor must have been loaded or initialised
        raise RuntimeError(f"tensors left unloaded: {leftover}")
    model.config.dtype = str(target).removeprefix("torch.")
    return model.eval()


def _checked(stream: TensorStream, infos: dict[str, TensorInfo], finite: bool | None, where: object):
    """The stream, each tensor checked for NaN / inf (unless ``finite`` is False): a tensor from a
    safetensors file through file reads of that file (its mapping stays untouched until the model uses it),
    any other tensor as it is (those readers materialise it anyway). The converters' readers (Meta, llama2.c,
    GGUF) warn on their own; those warnings are silenced while a tensor is produced, so each tensor is
    reported once, here, as ``finite`` asks."""
    tensors = stream()
    scanned: dict[Path, dict[str, int]] = {}
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteWeightWarning)
            item = next(tensors, None)
        if item is None:
            return
        name, tensor = item
        info = infos.get(name)
        if finite is False:
            pass
        elif info is not None and info.file.suffix == ".safetensors":
            if info.file not in scanned:
                scanned = {info.file: safetensors_non_finite(info.file)}  # one shard at a time, as the stream
            report_non_finite(name, scanned[info.file].get(name, 0), tensor.numel(), where, bool(finite))
        else:
            check_finite(name, tensor, where, error=bool(finite))
        yield item


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A no-op (keeping the mmapped storage) when dtype and device already match.
    return t.to(device=device, dtype=dtype)


def _quantization(config: LlamaConfig, quantize: Any, load_in_8bit: bool) -> Int8Config | None:
    """The int8 setting for this load: the checkpoint's own, or the one asked for (not both)."""
    if load_in_8bit:
        if quantize not in (None, "int8"):
            raise ValueError(f"load_in_8bit=True means quantize='int8'; got quantize={quantize!r} as well")
        quantize = "int8"
    if config.quantization_config:
        if quantize is not None:
            raise ValueError("the checkpoint is already quantized (config.json quantization_config "
                             f"{config.quantization_config}); load it without quantize=/load_in_8bit")
        return Int8Config.parse(config.quantization_config)
    return Int8Config.parse(quantize) if quantize is not None else None

