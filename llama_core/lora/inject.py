"""Adding adapters to a model by HF module names, and taking them out again (merged or dropped).

``add_lora`` freezes every existing parameter and swaps each targeted linear for a ``LoraLinear`` around it,
so only the adapters train; the config is kept on the model (``model.lora_config``) for ``save_adapter``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant import Int8Linear, dequantize
from .config import LORA_TARGETS, LoraConfig
from .layer import LoraLinear


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Full module name -> adapter layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every targeted linear (``config.targets(name)``) in a LoraLinear, in place; freeze everything else.
    Returns the wrapped names. Targets must be nn.Linear or weight-only Int8Linear layers."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters: unload_lora() or merge_and_unload() it first")
    found = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not config.targets(full):
                continue
            if type(child) not in (nn.Linear, Int8Linear):
                raise ValueError(f"LoRA target {full} is a {type(child).__name__}, not a linear layer")
            found.append((module, child_name, full))
    if not found:
        raise ValueError(f"no module of the model matches target_modules {config.target_modules!r}")
    if isinstance(config.target_modules, str):  # a regular expression could reach beyond the decoder's linears
        odd = [full for _, _, full in found if full.rpartition(".")[2] not in LORA_TARGETS]
        if odd:
            raise ValueError(f"target_modules {config.target_modules!r} selects {odd[:3]}: adapters go only on "
                             f"{', '.join(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, _ in found:
        setattr(parent, child_name, LoraLinear(getattr(parent, child_name), config.r, config.scaling,
                                               config.lora_dropout))
    model.lora_config = config
    return [full for _, _, full in found]


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict name is an adapter weight (``...q_proj.lora_A.weight``), not a base weight."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights by the model's own names (``model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place (see LoraLinear.merge); ``unmerge_lora`` undoes it."""
    layers = _require_layers(model)
    for layer in layers.values():
        layer._check_mergeable()  # all or nothing: refuse before touching any weight
    for layer in layers.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in _require_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every adapter layer by one plain nn.Linear with the adapter folded in, and dequantise any other
    int8 layers, so the model saves as an ordinary full-precision HF checkpoint. In place; returns the model."""
    for name, layer in _require_layers(model).items():
        _replace(model, name, layer.merged_linear(dtype))
    if any(type(m) is Int8Linear for m in model.modules()):
        dequantize(model, dtype or torch.float32)
    elif getattr(getattr(model, "config", None), "quantization_config", None):
        model.config.quantization_config = None  # every int8 layer was an adapter's base: none is left
    model.lora_config = None
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters (an unmerged model gets its base back unchanged). In place; returns the model."""
    for name, layer in _require_layers(model).items():
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    model.lora_config = None
    return model


def _require_layers(model: nn.Module) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    return layers


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
