"""Meta's original checkpoints: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel rank.

Tensor names (``layers.0.attention.wq.weight`` ...) map one to one onto HF names. Ranks hold slices of
each tensor: column-parallel wq/wk/wv/w1/w3/output on dim 0, row-parallel wo/w2 on dim 1, norms
replicated, and the token embedding on dim 1 (Llama 1/2, ParallelEmbedding) or dim 0 (Llama 3,
VocabParallelEmbedding), told apart by the shapes. q/k rows use Meta's interleaved RoPE layout and are
permuted to rotate-half (see permute.py).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llama_core.model_io.hf_checkpoint import check_finite, contained_file
from llama_core.modeling.config import LlamaConfig

from .permute import half_to_interleaved, interleaved_to_half
from .source import CheckpointSource, TensorSpec

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # Meta suffix -> HF suffix, in HF's state-dict order
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_SPLIT_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w2.weight": 1}
IGNORED_META_KEYS = {"rope.freqs"}  # Llama 1/2 store their inv_freq table; it is derived from params
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")
# Meta's apply_scaling defaults (llama3.1 reference code), used only where params.json does not say.
_LLAMA3_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
_PARAMS_ROPE_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_original_max_position_embeddings"}
ORIGINAL_PARAMS_KEY = "original_meta_params"  # kept in config.json so HF -> Meta restores params.json exactly
# Meta's format has no context length (max_seq_len is an argument of Meta's Llama.build, and a params.json
# key of that name would clash with it). HF -> Meta writes the HF value under this key, which llama-models'
# ModelArgs ignores (it keeps only attributes it has), when the reader could not infer it otherwise.
CONTEXT_KEY = "max_position_embeddings"
# params.json fields: (type, may be absent or null); counts must be positive, floats finite and positive.
_PARAM_INTS = {"dim": False, "n_layers": False, "n_heads": False, "n_kv_heads": True, "multiple_of": True,
               "max_seq_len": True, CONTEXT_KEY: True}
_PARAM_FLOATS = {"norm_eps": False, "rope_theta": True, "ffn_dim_multiplier": True}


def meta_to_hf_name(key: str) -> str | None:
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _LAYER.match(key)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_meta_name(key: str) -> str:
    for meta, hf in _TOP_NAMES.items():
        if key == hf:
            return meta
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
    for meta, hf in _LAYER_NAMES.items():
        if m and m.group(2) == hf:
            return f"layers.{m.group(1)}.{meta}"
    raise ValueError(f"{key} has no Meta equivalent")


def split_dim(meta_key: str, embedding_dim: int | None) -> int | None:
    """Model-parallel axis of a Meta tensor; None for replicated tensors (norms)."""
    if meta_key == "tok_embeddings.weight":
        return embedding_dim
    suffix = _LAYER.match(meta_key).group(2) if _LAYER.match(meta_key) else meta_key
    return _SPLIT_DIM.get(suffix)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_params(directory: Path) -> dict[str, Any]:
    path = directory / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no params.json (needed for a Meta checkpoint)")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(params).__name__}")
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{path} is missing {', '.join(missing)}")
    _check_params(params, path)
    return params


def _check_params(params: dict[str, Any], path: Path) -> None:
    """Type and range of every numeric field, before any is used as a count (``n_layers: 1e9`` must not
    build a billion names) or reaches the model (a NaN rope_theta would give NaN logits)."""
    for key, optional in {**_PARAM_INTS, **_PARAM_FLOATS}.items():
        value = params.get(key)
        if value is None and (optional or key not in params):
            continue
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (integral if key in _PARAM_INTS else real):
            kind = "an integer" if key in _PARAM_INTS else "a number"
            raise TypeError(f"{path}: {key} must be {kind}, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{path}: {key} must be a finite positive number, got {value!r}")
    vocab = params.get("vocab_size", -1)
    if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or (vocab <= 0 and vocab != -1):
        raise ValueError(f"{path}: vocab_size must be a positive integer or -1 (from the tokenizer), got {vocab!r}")


def _missing_tensors(shapes: dict[str, Any], n_layers: int, present: set[int]) -> tuple[int, list[str]]:
    """How many of the tensors ``n_layers`` layers need are absent, and the first few names: counted in
    O(layers present), never by listing every name ``n_layers`` implies (it comes from an unchecked file)."""
    top = [k for k in ("tok_embeddings.weight", "norm.weight") if k not in shapes]
    count = len(top) + len(_LAYER_NAMES) * (n_layers - len(present))
    count += sum(f"layers.{i}.{suffix}" not in shapes for i in present for suffix in _LAYER_NAMES)
    names, i = top[:6], 0
    while len(names) < 6 and i < n_layers:
        names += [k for suffix in _LAYER_NAMES if (k := f"layers.{i}.{suffix}") not in shapes][:6 - len(names)]
        i += 1
    return count, names


def params_to_config(params: dict[str, Any], vocab_size: int, intermediate_size: int, tied: bool,
                     dtype: torch.dtype, max_position_embeddings: int | None = None) -> LlamaConfig:
    dim, n_heads = params["dim"], params["n_heads"]
    expected_ffn = ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    if expected_ffn != intermediate_size:
        raise ValueError(
            f"params.json (multiple_of={params.get('multiple_of', 256)}, ffn_dim_multiplier="
            f"{params.get('ffn_dim_multiplier')}) gives an FFN size of {expected_ffn}, but w1 has {intermediate_size} rows"
        )
    params_vocab = params.get("vocab_size", -1)
    if params_vocab > 0 and params_vocab != vocab_size:
        raise ValueError(f"params.json vocab_size {params_vocab} != token embedding rows {vocab_size}")
    llama3 = vocab_size >= 128000
    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {"rope_type": "llama3"}
        for key, default in _LLAMA3_ROPE_DEFAULTS.items():
            rope_scaling[key] = params.get(_PARAMS_ROPE_KEYS[key], default)
    if max_position_embeddings is None:
        max_position_embeddings = params.get(CONTEXT_KEY) or params.get("max_seq_len") or _released_context(
            params, vocab_size)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads") or n_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=params["norm_eps"], rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling, tie_word_embeddings=tied,
        bos_token_id=128000 if llama3 else 1, eos_token_id=128001 if llama3 else 2,
        dtype=str(dtype).removeprefix("torch."), extra={ORIGINAL_PARAMS_KEY: params},
    )


def _released_context(params: dict[str, Any], vocab_size: int) -> int:
    """params.json rarely says the context length; these are the released ones of each generation."""
    llama3 = vocab_size >= 128000
    return (131072 if params.get("use_scaled_rope") else 8192 if llama3
            else 4096 if params.get("vocab_size", -1) == -1 else 2048)


def config_to_params(config: LlamaConfig) -> dict[str, Any]:
    """params.json for a config: the original file's values when this checkpoint came from Meta's."""
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"Meta's format needs head_dim * n_heads == dim; got head_dim {config.head_dim}")
    if config.attention_bias or config.mlp_bias:
        raise ValueError("Meta's format has no attention or MLP biases")
    if config.rope_type not in ("default", "llama3"):
        raise ValueError(f"Meta's format has no {config.rope_type} rope scaling")
    params = dict(config.extra.get(ORIGINAL_PARAMS_KEY) or {})
    params.update(dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                  n_kv_heads=config.num_key_value_heads, norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta)
    if params.get("vocab_size", -1) != -1 or "vocab_size" not in params:
        params["vocab_size"] = config.vocab_size
    if ffn_hidden_dim(config.hidden_size, params.get("multiple_of", 256),
                      params.get("ffn_dim_multiplier")) != config.intermediate_size:
        multiple_of, multiplier = _ffn_params(config.hidden_size, config.intermediate_size)
        params["multiple_of"] = multiple_of
        params.pop("ffn_dim_multiplier", None)
        if multiplier is not None:  # released params.json files omit the key rather than write null
            params["ffn_dim_multiplier"] = multiplier
    if config.rope_type == "llama3":
        params["use_scaled_rope"] = True
        for key, default in _LLAMA3_ROPE_DEFAULTS.items():
            value = config.rope_scaling[key]
            if value != default or _PARAMS_ROPE_KEYS[key] in params:
                params[_PARAMS_ROPE_KEYS[key]] = value
    else:
        params.pop("use_scaled_rope", None)
    params.pop(CONTEXT_KEY, None)
    if config.max_position_embeddings != (params.get("max_seq_len") or _released_context(params, config.vocab_size)):
        params[CONTEXT_KEY] = config.max_position_embeddings  # else HF -> Meta -> HF would change it
    return params


def _ffn_params(dim: int, intermediate: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) reproducing ``intermediate`` under Meta's sizing formula."""
    for multiple_of in (4096, 1024, 256):  # the values of released models first
        for multiplier in (None, 1.0, 1.3, 1.5):
            if ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate:
                return multiple_of, multiplier
    return intermediate, intermediate / int(2 * (4 * dim) / 3)


# ---------------------------------------------------------------------------------------------- reading
def _shard_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{directory} has no consolidated.*.pth files")
    # A rank file that is a symlink out of the checkpoint directory is refused, as HF shards are.
    files = [contained_file(directory, f.name, directory) for f in files]
    numbers = [int(f.name.split(".")[1]) for f in files]
    if numbers != list(range(len(files))):
        raise ValueError(f"{directory}: model-parallel shards must be numbered 00..{len(files) - 1:02d}, "
                         f"found {', '.join(f.name for f in files)}")
    return files


def _open_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped, weights-only: no tensor data is read until used, no code is unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return state


def is_meta_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and (directory / "params.json").is_file() and any(directory.glob("consolidated.*.pth"))


def read_meta(directory: str | Path, dtype: torch.dtype | None = None, group_bytes: int = 1 << 30,
              max_position_embeddings: int | None = None) -> CheckpointSource:
    """A Meta checkpoint as HF-named, HF-layout tensors, merged across ranks.

    The stream maps all rank files for a group of tensors of at most ``group_bytes``, yields them one by
    one, then releases the mappings, so resident memory stays near one group.
    """
    directory = Path(directory)
    params = read_params(directory)
    files = _shard_files(directory)
    shapes: list[dict[str, tuple[torch.Size, torch.dtype]]] = []
    for f in files:
        state = _open_shard(f)
        shapes.append({k: (t.shape, t.dtype) for k, t in state.items() if k not in IGNORED_META_KEYS})
        del state
    keys = list(shapes[0])
    for f, s in zip(files[1:], shapes[1:], strict=True):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"{f.name} and {files[0].name} hold different tensors: {', '.join(diff[:6])}")
    unknown = [k for k in keys if meta_to_hf_name(k) is None]
    if unknown:
        raise ValueError(f"{directory}: unknown Meta tensor names: {', '.join(unknown[:6])}")
    present = {int(m.group(1)) for k in keys if (m := _LAYER.match(k))}
    beyond = sorted(i for i in present if i >= params["n_layers"])
    if beyond:
        raise ValueError(f"{directory}: params.json says n_layers={params['n_layers']}, but the shards hold "
                         f"layer {beyond[-1]}")
    count, missing = _missing_tensors(shapes[0], params["n_layers"], present)
    if count:
        raise ValueError(f"{directory} (n_layers={params['n_layers']} in params.json) is missing "
                         f"{count} tensors: {', '.join(missing)}")
    dtypes = {d for s in shapes for _, d in s.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{directory}: mixed dtypes {sorted(map(str, dtypes))}; a Meta checkpoint has one")
    stored = dtypes.pop()
    if not stored.is_floating_point:
        raise ValueError(f"{directory}: tensors are {stored}, expected floating point")
    target = dtype or stored

    n = len(files)
    emb_shape = shapes[0]["tok_embeddings.weight"][0]
    embedding_dim = None
    if n > 1:
        embedding_dim = 1 if emb_shape[1] * n == params["dim"] else 0 if emb_shape[1] == params["dim"] else None
        if embedding_dim is None:
            raise ValueError(f"tok_embeddings shape {list(emb_shape)} in {n} shards does not match dim {params['dim']}")

    merged: dict[str, tuple[int, ...]] = {}
    for key in keys:
        axis = split_dim(key, embedding_dim)
        per_shard = [s[key][0] for s in shapes]
        if axis is None or n == 1:
            if any(p != per_shard[0] for p in per_shard):
                raise ValueError(f"replicated tensor {key} has different shapes across shards: {per_shard}")
            merged[key] = tuple(per_shard[0])
            continue
        others = {tuple(p[:axis]) + tuple(p[axis + 1:]) for p in per_shard}
        if len(others) != 1:
            raise ValueError(f"{key}: shard shapes {[list(p) for p in per_shard]} cannot be joined on dim {axis}")
        full = list(per_shard[0])
        full[axis] = sum(p[axis] for p in per_shard)
        merged[key] = tuple(full)

    vocab, width = merged["tok_embeddings.weight"]
    if width != params["dim"]:
        raise ValueError(f"{directory}: tok_embeddings is {vocab} x {width}, but params.json says dim={params['dim']}")
    intermediate = merged["layers.0.feed_forward.w1.weight"][0]
    config = params_to_config(params, vocab, intermediate, "output.weight" not in merged, target,
                              max_position_embeddings)
    heads = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}

    order = sorted(keys, key=_hf_order)
    specs = {meta_to_hf_name(k): TensorSpec(merged[k], target) for k in order}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        groups: list[list[str]] = [[]]
        size = 0
        for k in order:
            nbytes = math.prod(merged[k]) * stored.itemsize
            if groups[-1] and size + nbytes > group_bytes:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += nbytes
        for group in groups:
            yield from _merge_group(files, group, embedding_dim, heads, target)

    return CheckpointSource(config, specs, stream, str(directory))


def _merge_group(files: list[Path], group: list[str], embedding_dim: int | None, heads: dict[str, int],
                 target: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Map every rank file, yield this group's merged HF tensors, then let the maps go. A function of
    its own so no local (a slice, a replicated norm) keeps a map, and its pages, alive past the group."""
    states = [_open_shard(f) for f in files]
    for k in group:
        axis = split_dim(k, embedding_dim)
        parts = [s[k] for s in states]
        if axis is None or len(parts) == 1:
            for f, p in zip(files[1:], parts[1:], strict=True):
                if not torch.equal(p, parts[0]):
                    raise ValueError(f"replicated tensor {k} differs between {files[0].name} and {f.name}")
            t = parts[0]
        else:
            t = torch.cat(parts, dim=axis)
        suffix = _LAYER.match(k).group(2) if _LAYER.match(k) else k
        if suffix in heads:
            t = interleaved_to_half(t, heads[suffix])
        t = t.to(target)
        check_finite(meta_to_hf_name(k), t, files[0].parent)
        yield meta_to_hf_name(k), t


def _hf_order(meta_key: str) -> tuple:
    """Sort Meta keys into transformers' state-dict order (embeddings, layers, norm, head)."""
    if meta_key == "tok_embeddings.weight":
        return (0,)
    m = _LAYER.match(meta_key)
    if m:
        return (1, int(m.group(1)), list(_LAYER_NAMES).index(m.group(2)))
    return (2, meta_key != "norm.weight")


# ---------------------------------------------------------------------------------------------- writing
def meta_shard_tensors(source: CheckpointSource, num_shards: int, rank: int,
                       embedding_dim: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of every tensor, in Meta's names and interleaved layout (one pass over the
    source; only this rank's slices are kept)."""
    config = source.config
    heads = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}
    out: dict[str, torch.Tensor] = {}
    for name, t in source.stream():
        key = hf_to_meta_name(name)
        axis = split_dim(key, embedding_dim)
        if axis is not None and num_shards > 1:
            if t.shape[axis] % num_shards:
                raise ValueError(f"{name} has {t.shape[axis]} entries on dim {axis}, not divisible by {num_shards} shards")
            width = t.shape[axis] // num_shards
            t = t.narrow(axis, rank * width, width)
        suffix = _LAYER.match(key).group(2) if _LAYER.match(key) else key
        if suffix in heads:
            # rows of whole heads stay together in a slice, so the per-head permutation applies to it alone
            t = half_to_interleaved(t, heads[suffix] // (num_shards if axis == 0 else 1))
        out[key] = t.contiguous().clone()
    return out


def default_embedding_split(config: LlamaConfig) -> int:
    """Llama 3 shards the embedding by vocabulary rows (dim 0), Llama 1/2 by hidden columns (dim 1)."""
    return 0 if config.vocab_size >= 128000 or config.rope_theta >= 500000 else 1
