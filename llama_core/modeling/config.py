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
    num_labels: int = 2
    problem_type: str | None = None  # "regression" | "single_label_classification" | "multi_label_classification"
    # Runtime choices, not architecture fields (never read from or written to config.json):
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"
    kernels: str = "auto"  # "auto" (Triton on CUDA when installed), "triton" or "torch"
    # Unknown keys found in a config.json, kept so that saving writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
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
    def validate(self) -> None:
        """Raise ValueError naming the offending field for configs no Llama can have."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
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
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
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
        """A copy with some fields changed (validated again)."""
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
        """Write ``config.json`` into ``directory`` (created if needed); atomic per file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "config.json"
        tmp = directory / ".config.json.tmp"
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, target)
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
    factor = scaling.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"rope_scaling.factor must be a positive number, got {factor!r}")
    if rope_type in ("linear", "dynamic") and factor < 1:
        raise ValueError(f"rope_scaling.factor must be >= 1 for {rope_type} scaling, got {factor}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor must be greater than rope_scaling.low_freq_factor")
