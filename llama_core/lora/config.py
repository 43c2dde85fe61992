"""LoraConfig: which linears get adapters, their rank and scale; and its PEFT ``adapter_config.json`` form.

Field names are PEFT's (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``), so a
config reads the same in both libraries. The adapter adds ``scaling * B @ A`` to a frozen weight ``W``
(``A [r, in]``, ``B [out, r]``), with ``scaling = lora_alpha / r`` (Hu et al. 2021), or
``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023: rank-stabilised, so larger ranks learn).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# The decoder's linears by their HF names; embeddings and lm_head are not adapter targets here.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT features whose adapters are not a plain ``W + scaling * B @ A`` over the listed linears: field -> the
# values that mean "off". A loaded config with any other value is refused, naming the field.
_UNSUPPORTED_PEFT_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None), "use_qalora": (False, None), "lora_bias": (False, None), "bias": ("none", None),
    "fan_in_fan_out": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""), "rank_pattern": (None, {}), "alpha_pattern": (None, {}),
    "exclude_modules": (None, [], ""), "trainable_token_indices": (None, {}, []), "layer_replication": (None, []),
    "target_parameters": (None, []), "megatron_config": (None,), "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False), "arrow_config": (None,), "monteclora_config": (None,), "velora_config": (None,),
    "kasa_config": (None,),
}
# Initialisations that also rewrite the base weights: the saved adapter is then relative to a modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # HF leaf names (a module is a target when its name ends with one), or PEFT's other form: one regular
    # expression that must match a module's full name (``re.fullmatch``).
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other PEFT fields, carried on save

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules {targets!r} is not a valid regular expression: {e}") from None
        else:
            targets = tuple(targets)
            if not targets:
                raise ValueError("target_modules is empty: name at least one of " + ", ".join(LORA_TARGETS))
            unknown = [t for t in targets if t not in LORA_TARGETS]
            if unknown:
                raise ValueError(f"unsupported LoRA target module(s) {unknown}: adapters go on "
                                 f"{', '.join(LORA_TARGETS)}")
            object.__setattr__(self, "target_modules", tuple(sorted(set(targets), key=LORA_TARGETS.index)))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, name: str) -> bool:
        """Whether the module called ``name`` (full dotted name) gets an adapter."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return name.rpartition(".")[2] in self.target_modules

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes for the same adapter (fields it reads when loading)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {**self.extra, "peft_type": "LORA", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": self.base_model_name_or_path, "r": self.r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": targets, "bias": "none",
                "fan_in_fan_out": False, "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "init_lora_weights": True, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: Any, source: object = "adapter_config.json") -> LoraConfig:
        """Read PEFT's config, refusing (naming the field) features this implementation does not have."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: must hold a JSON object, got {type(data).__name__}")
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; only 'LORA' adapters are supported")
        for name, off in _UNSUPPORTED_PEFT_FIELDS.items():
            if name in data and data[name] not in off:
                raise ValueError(f"{source}: {name}={data[name]!r} is not supported (a plain LoRA adapter needs "
                                 f"{name} to be {off[0]!r})")
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            logger.warning("%s: init_lora_weights=%r also changed the base weights when it was trained; this "
                           "adapter is exact only over that modified base", source, init)
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        targets = data["target_modules"]
        if not isinstance(targets, (str, list)):
            raise ValueError(f"{source}: target_modules must be a list of names or a regular expression, "
                             f"got {targets!r}")
        known = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "base_model_name_or_path"}
        try:
            return cls(r=data["r"], lora_alpha=data["lora_alpha"], lora_dropout=data.get("lora_dropout") or 0.0,
                       target_modules=targets if isinstance(targets, str) else tuple(targets),
                       use_rslora=bool(data.get("use_rslora", False)),
                       base_model_name_or_path=data.get("base_model_name_or_path"),
                       extra={k: v for k, v in data.items() if k not in known})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
