"""LlamaConfig: the model's hyper-parameters, with Hugging Face field names and config.json I/O.

Reads both config.json generations:
  * transformers <= 4.x: ``rope_theta`` + ``rope_scaling`` (with ``type`` or ``rope_type``), ``torch_dtype``
  * transformers >= 5:   ``rope_parameters`` (holding ``rope_type`` and ``rope_theta``), ``dtype``
and writes both, so the files we save load in either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .presets import preset_fields

logger = logging.getLogger(__name__)

# Rope types and the scaling keys each one requires (beyond rope_type / rope_theta).
ROPE_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}

# Keys that config.json files carry but that describe the file, not the model; dropped on read.
_FILE_ONLY_KEYS = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map"}

# Field types, checked before any arithmetic on them: a config.json string or bool where a number belongs
# would otherwise fail deep inside (or, worse, silently: ``nan <= 0`` is False).
_COUNT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "pretraining_tp", "num_labels")
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id")
_BOOL_FIELDS = ("use_cache", "tie_word_embeddings", "attention_bias", "mlp_bias")
# float field -> (lowest allowed, whether the lowest itself is allowed, highest allowed)
_FLOAT_RANGES = {"rms_norm_eps": (0.0, False, math.inf), "rope_theta": (0.0, False, math.inf),
                 "initializer_range": (0.0, True, math.inf), "attention_dropout": (0.0, True, 1.0)}
# rope_scaling keys that hold numbers; every one must be finite, these ones also positive.
_ROPE_POSITIVE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                       "attention_factor", "beta_fast", "beta_slow")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # None for plain RoPE, else a dict with "rope_type" and that type's keys (see ROPE_REQUIRED_KEYS).
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # Storage dtype of the checkpoint as a string ("bfloat16", ...); used by from_pretrained(dtype="auto").
    dtype: str | None = None
    # int8 checkpoints (llama_core.quant): {"quant_method": "llama_core_int8", "mode", "threshold", "skip"}.
    quantization_config: dict[str, Any] | None = None
    # Task heads.
    # None -> len(id2label), else 2 (transformers' PretrainedConfig). config.json files written by transformers
    # carry only id2label / label2id; we write all three.
    num_labels: int | None = None
    id2label: dict[int, str] | None = None  # None -> {i: "LABEL_i"}
    label2id: dict[str, int] | None = None  # None -> the inverse of id2label
    problem_type: str | None = None  # "regression" | "single_label_classification" | "multi_label_classification"
    # Runtime choices, not architecture fields (never read from or written to config.json):
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"
    kernels: str = "auto"  # "auto" (Triton on CUDA when installed), "triton" or "torch"
    # Unknown keys found in a config.json, kept so that saving writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self._resolve_labels()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly or fix the head count"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """TypeError naming the field for a value of the wrong type; numbers are normalised to int / float."""
        for name in _COUNT_FIELDS + _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_int(value, name))
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            self.eos_token_id = ([_as_int(v, "eos_token_id") for v in eos] if isinstance(eos, (list, tuple))
                                 else _as_int(eos, "eos_token_id"))
        for name in _FLOAT_RANGES:
            setattr(self, name, _as_float(getattr(self, name), name))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("hidden_act", "dtype", "problem_type"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
        for name in ("rope_scaling", "quantization_config", "id2label", "label2id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a mapping, got {value!r}")

    def _resolve_labels(self) -> None:
        """num_labels, id2label and label2id made consistent as transformers does: a num_labels that disagrees
        with id2label wins (with a warning) and the label names become the defaults."""
        id2label = None
        if self.id2label is not None:
            try:  # JSON object keys are strings: {"0": "negative", ...}
                id2label = {_as_int(int(k) if isinstance(k, str) else k, "id2label key"): v
                            for k, v in self.id2label.items()}
            except ValueError as e:
                raise ValueError(f"id2label keys must be label indices, got {list(self.id2label)!r}") from e
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
        if self.num_labels is None:
            self.num_labels = len(id2label) if id2label else 2
        if id2label is not None and len(id2label) != self.num_labels:
            logger.warning("num_labels=%d disagrees with id2label (%d labels): using num_labels and default "
                           "label names", self.num_labels, len(id2label))
            id2label, self.label2id = None, None
        if self.num_labels <= 0:
            raise ValueError(f"num_labels must be a positive integer, got {self.num_labels}")
        self.id2label = id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {str(k): _as_int(v, f"label2id[{k!r}]") for k, v in self.label2id.items()}

    def validate(self) -> None:
        """Raise ValueError naming the offending field for configs no Llama can have."""
        self._check_types()
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary (vocab_size {self.vocab_size})")
        for name, (low, inclusive, high) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            # math.isfinite first: NaN fails no comparison, so a range check alone lets it through.
            if not math.isfinite(value) or value < low or (value == low and not inclusive) or value > high:
                bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.pretraining_tp != 1:
            # The output is mathematically identical to tp=1; we always compute it in one matmul.
            logger.info("pretraining_tp=%s is ignored: the full matmul is used", self.pretraining_tp)
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)

    # ------------------------------------------------------------------ derived
    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed (validated again). A new num_labels brings default label names
        unless id2label comes with it; a new id2label sets num_labels."""
        if "num_labels" in changes and "id2label" not in changes:
            changes.update(id2label=None, label2id=None)
        elif "id2label" in changes and "num_labels" not in changes:
            changes.update(num_labels=None, label2id=changes.get("label2id"))
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ dict / json
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build from a config.json-style dict of either transformers generation."""
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in (None, "llama"):
            raise ValueError(f"model_type is {model_type!r}; only 'llama' checkpoints are supported")
        for key in _FILE_ONLY_KEYS:
            data.pop(key, None)

        # transformers v5: rope_parameters = {"rope_type", "rope_theta", ...}
        rope_parameters = data.pop("rope_parameters", None)
        rope_scaling = data.pop("rope_scaling", None)
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                raise ValueError(f"rope_parameters must be a mapping, got {rope_parameters!r}")
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                data.setdefault("rope_theta", rope_parameters.pop("rope_theta"))
            rope_scaling = rope_scaling or rope_parameters
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"rope_scaling must be a mapping, got {rope_scaling!r}")
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
                rope_scaling = None
        data["rope_scaling"] = rope_scaling

        torch_dtype = data.pop("torch_dtype", None)
        if data.get("dtype") is None and torch_dtype is not None:
            data["dtype"] = torch_dtype
        data.pop("attn_implementation", None)  # runtime choices, never read from a file
        data.pop("kernels", None)

        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "attn_implementation", "kernels"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """An HF-compatible config.json dict, readable by transformers 4.x and 5.x."""
        out: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "attn_implementation", "kernels", "rope_scaling", "dtype"):
                continue
            if f.name == "quantization_config" and self.quantization_config is None:
                continue  # transformers treats a present quantization_config as a request to quantise
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        out["dtype"] = out["torch_dtype"] = self.dtype
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}  # JSON keys are strings, as transformers
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LlamaConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = read_json_object(path)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid config {path}: {e}") from e

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LlamaConfig:
        """Read ``config.json`` from a local directory (hub ids: use LlamaForCausalLM.from_pretrained)."""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"no such directory: {directory}")
        return cls.from_json_file(directory / "config.json" if directory.is_dir() else directory)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` (created if needed) atomically: a temporary named for this
        process (so concurrent writers never share one), flushed to disk, then renamed over the target.
        (``save_pretrained`` of a model writes its config inside model_io's locked atomic directory.)"""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "config.json"
        tmp = directory / f".config.json.tmp.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_json_string())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """The named config (see ``presets``), with ``overrides`` applied (e.g. ``num_hidden_layers=2``)."""
        return cls(**{**preset_fields(name), **overrides})


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or a ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _normalise_rope_scaling(scaling: dict[str, Any]) -> dict[str, Any]:
    """Accept the legacy ``type`` key and store the canonical ``rope_type``."""
    scaling = dict(scaling)
    legacy = scaling.pop("type", None)
    scaling.setdefault("rope_type", legacy)
    scaling.pop("rope_theta", None)  # lives in LlamaConfig.rope_theta
    return scaling


def _validate_rope_scaling(scaling: dict[str, Any]) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_REQUIRED_KEYS:
        raise ValueError(
            f"rope_scaling.rope_type {rope_type!r} is not supported; known: {sorted(ROPE_REQUIRED_KEYS)}"
        )
    missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling ({rope_type}) is missing {', '.join('rope_scaling.' + k for k in missing)}")
    for key, value in scaling.items():
        if key in _ROPE_POSITIVE_KEYS and value is not None:
            number = _as_float(value, f"rope_scaling.{key}")
            if not math.isfinite(number) or number <= 0:
                raise ValueError(f"rope_scaling.{key} must be a finite positive number, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"rope_scaling.{key} must be finite, got {value!r}")
    original = scaling.get("original_max_position_embeddings")
    if original is not None:
        _as_int(original, "rope_scaling.original_max_position_embeddings")
    factor = scaling.get("factor")
    if rope_type in ("linear", "dynamic") and factor < 1:
        raise ValueError(f"rope_scaling.factor must be >= 1 for {rope_type} scaling, got {factor}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor must be greater than rope_scaling.low_freq_factor")


def _as_int(value: Any, name: str) -> int:
    """``value`` as an int, or a TypeError naming the field (bools and floats are not counts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    """``value`` as a float (ints accepted), or a TypeError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)
