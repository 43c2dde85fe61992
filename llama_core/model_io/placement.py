"""Device maps: which device holds each module of a model split across GPUs and the CPU.

A device map is a dict of module prefix -> device (``{"model.embed_tokens": "cuda:0", "model.layers.0":
"cuda:0", ..., "lm_head": "cpu"}``; ``""`` covers everything). ``"auto"`` fills the GPUs in order, layer by
layer, within ``max_memory``, then the CPU. The forward moves hidden states at each boundary.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "500MB", "30KB" or "2GiB" (2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size)) if isinstance(size, str) else None
    if not match:
        raise ValueError(f"cannot read size {size!r}; use an int of bytes or a string such as '5GB', '500MB', '2GiB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    value = int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _device(value: int | str | torch.device) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    if str(value) == "disk":
        raise ValueError("device_map value 'disk' (offloading to disk) is not supported")
    return torch.device(value)


def placement_units(model: nn.Module) -> list[str]:
    """Module prefixes in execution order: embeddings, each decoder layer, final norm, then heads."""
    base = getattr(model, "base_model_prefix", "")
    p = f"{base}." if base else ""
    units = [f"{p}embed_tokens"] + [f"{p}layers.{i}" for i in range(len(model.base_model.layers))] + [f"{p}norm"]
    if base:  # heads (lm_head, score, qa_outputs) sit beside the base model
        units += [name for name, _ in model.named_children() if name != base]
    return units


def _unit_bytes(model: nn.Module, unit: str, dtype: torch.dtype) -> int:
    module = model.get_submodule(unit)
    params = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                 for t in module.parameters())
    return params + sum(t.numel() * t.element_size() for t in module.buffers())  # e.g. int8 weights, scales


def _available_memory(max_memory: dict | None) -> list[tuple[torch.device, int]]:
    devices: list[tuple[torch.device, int]] = []
    given = {str(_device(k)): parse_size(v) for k, v in (max_memory or {}).items()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            d = torch.device("cuda", i)
            if max_memory is not None and str(d) not in given:
                continue
            free = given.get(str(d)) or int(torch.cuda.mem_get_info(i)[0] * 0.9)  # 10% for activations
            devices.append((d, free))
    devices.append((torch.device("cpu"), given.get("cpu", 1 << 62)))
    return devices


def infer_device_map(model: nn.Module, dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, torch.device]:
    """Greedy in-order placement of ``placement_units`` onto the GPUs, then the CPU."""
    devices = _available_memory(max_memory)
    tied = getattr(model.config, "tie_word_embeddings", False)
    mapping: dict[str, torch.device] = {}
    slot, used = 0, 0
    for unit in placement_units(model):
        if unit == "lm_head" and tied:
            continue  # shares the embedding tensor, so lives where the embedding lives
        size = _unit_bytes(model, unit, dtype)
        while slot < len(devices) - 1 and used + size > devices[slot][1]:
            slot, used = slot + 1, 0
        if used + size > devices[slot][1]:
            raise ValueError(f"the model does not fit in max_memory={max_memory}: {unit} needs {size} bytes")
        mapping[unit] = devices[slot][0]
        used += size
    if tied and "lm_head" in placement_units(model):
        mapping["lm_head"] = mapping[placement_units(model)[0]]
    return mapping


def resolve_device_map(model: nn.Module, device_map: str | dict | None, device: str | torch.device,
                       dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, torch.device]:
    """Normalise any accepted ``device_map`` (None, "auto", or a dict) to prefix -> torch.device."""
    if device_map is None:
        return {"": torch.device(device)}
    if device_map == "auto":
        return infer_device_map(model, dtype, max_memory)
    if isinstance(device_map, str):
        return {"": _device(device_map)}
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be None, 'auto', a device or a dict, got {type(device_map).__name__}")
    mapping = {k: _device(v) for k, v in device_map.items()}
    uncovered = [name for name, _ in model.named_parameters() if device_for(name, mapping) is None]
    if uncovered:
        raise ValueError(f"device_map does not place these parameters: {', '.join(uncovered[:8])}"
                         + (f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else ""))
    return mapping


def device_for(name: str, mapping: dict[str, torch.device]) -> torch.device | None:
    """The device of the longest prefix of ``name`` in ``mapping``."""
    best, best_len = None, -1
    for prefix, dev in mapping.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = dev, len(prefix)
    return best
