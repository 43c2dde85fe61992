"""Adapter directories in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT saves a causal-LM adapter's tensors under the PeftModel's names without the adapter name:
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (``base_model.model.`` wraps the HF
model, whose own name follows). We write exactly that, so ``PeftModel.from_pretrained(hf_model, dir)``
loads our adapters, and read it back, so PEFT's adapters load here. Safetensors only (never a pickle);
written atomically (a temporary directory renamed into place).

Loading checks the file against the model before changing anything: every tensor must belong to a targeted
linear and have its shape (``lora_A [r, in]``, ``lora_B [out, r]``), every targeted linear must have both,
and PEFT features we do not implement (DoRA, rank patterns, ...) are refused naming the config field.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..model_io.atomic import atomic_directory
from ..model_io.safetensors_writer import write_safetensors
from .config import LoraConfig
from .inject import adapter_state_dict, add_lora, lora_layers, unload_lora

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoraConfig | None = None,
                 state: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter of ``model`` (its ``lora_config`` unless ``config`` is given) to ``directory``.
    ``state``: the adapter tensors by model names, when they were gathered elsewhere (sharded training)."""
    config = config or getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save (add_lora or load_adapter first)")
    state = adapter_state_dict(model) if state is None else state
    if not state:
        raise ValueError("no lora_A / lora_B tensors to save")
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with atomic_directory(directory) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / ADAPTER_WEIGHTS, specs, iter(tensors.items()))
    target = Path(directory).expanduser().absolute()
    logger.info("saved LoRA adapter (%d tensors, r=%d) to %s", len(tensors), config.r, target)
    return target


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The config and the tensors (by the model's names, PEFT's prefix removed) of an adapter directory."""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapter: no {ADAPTER_CONFIG} in it")
    if not weights_file.is_file():
        hint = " (adapter_model.bin is a pickle and is never read: re-save it as safetensors)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    config = LoraConfig.from_peft_dict(data, config_file)
    try:
        raw = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    tensors = {}
    for key, tensor in raw.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_file}: tensor {key} does not start with {PEFT_PREFIX!r} (not a causal-LM "
                             f"PEFT adapter)")
        name = key.removeprefix(PEFT_PREFIX)
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"{weights_file}: tensor {key} is not a lora_A / lora_B weight (DoRA magnitudes, "
                             f"embedding adapters and saved modules are not supported)")
        tensors[name] = tensor
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoraConfig:
    """Add the adapter saved in ``directory`` (by PEFT or by ``save_adapter``) to ``model``, in place; returns
    its config. On any mismatch the model is left as it was."""
    config, tensors = read_adapter(directory)
    where = Path(directory) / ADAPTER_WEIGHTS
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    add_lora(model, config)
    try:
        _copy_checked(model, tensors, where)
    except BaseException:
        unload_lora(model)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        raise
    logger.info("loaded LoRA adapter from %s (r=%d, %d layers)", directory, config.r, len(lora_layers(model)))
    return config


def _copy_checked(model: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    expected = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} tensor(s) for modules the config does not target or the "
                         f"model does not have, e.g. {PEFT_PREFIX}{unexpected[0]}")
    if missing:
        raise ValueError(f"{where}: {len(missing)} adapter tensor(s) missing, e.g. {PEFT_PREFIX}{missing[0]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{where}: {PEFT_PREFIX}{name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: {PEFT_PREFIX}{name} has dtype {tensor.dtype}, expected a float type")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
