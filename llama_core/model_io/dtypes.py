"""Dtype names: what users may pass as ``dtype=`` and how safetensors headers spell each dtype.

One table each way, so the reader and the writer cannot disagree about a dtype.
"""

from __future__ import annotations

import torch

_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}

# torch dtype -> the safetensors header's name for it (the format's full list of what we store).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating-point torch dtype from a torch.dtype or a name ("bf16", "torch.float16", ...)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"unsupported dtype {dtype}: model weights must be floating point")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(set(_NAMES))} or a torch.dtype")
    return _NAMES[key]


def safetensors_dtype(name: str, where: str) -> torch.dtype:
    """The torch dtype of a safetensors header's dtype name; ``where`` names the file and tensor for errors."""
    if name not in _FROM_SAFETENSORS:
        raise ValueError(f"{where} has unsupported dtype {name}")
    return _FROM_SAFETENSORS[name]
