"""Llama 3.1-style rope scaling in GGUF: llama.cpp stores it as a ``rope_freqs`` tensor of per-frequency
divisors (``inv_freq_scaled = inv_freq / rope_freqs``), not as the four numbers of HF's ``rope_scaling``.

Writing computes the divisors from llama_core's own ``llama3_rope``. Reading recovers the numbers: the
plateau gives ``factor``; on the ramp between the two wavelength thresholds the divisor is
``1 / ((1 - s) / factor + s)`` with ``s = (L / wavelen - low) / (high - low)``, linear in ``1 / wavelen``, so a
line through the ramp gives ``low`` and ``high`` for the given original context ``L``. The formula depends
on ``L / low`` and ``L / high`` only, so ``L`` (not stored by llama.cpp) is taken from the metadata when
present, else Llama 3.1's 8192. The result is accepted only if ``llama3_rope`` reproduces the stored
divisors; anything else is refused rather than approximated.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llama_core.modeling.rope import ROPE_FUNCTIONS

DEFAULT_ORIGINAL_CONTEXT = 8192  # Llama 3.1 / 3.2
_RTOL = 1e-5


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    rope_type = (scaling or {}).get("rope_type", "default")
    return ROPE_FUNCTIONS[rope_type](head_dim, theta, scaling, 0)[0].double()


def rope_freqs_for(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """The float32 ``rope_freqs`` divisors of a ``llama3`` rope_scaling, as llama.cpp expects them."""
    return (_inv_freq(head_dim, theta, None) / _inv_freq(head_dim, theta, scaling)).float()


def _nice(x: float) -> float:
    return float(f"{x:.6g}")


def llama3_scaling_from_rope_freqs(freqs: torch.Tensor, head_dim: int, theta: float,
                                   original_context: int | None, where: str) -> dict[str, Any]:
    """HF's ``llama3`` rope_scaling that gives exactly these ``rope_freqs`` (a ValueError otherwise)."""
    freqs = freqs.double().flatten()
    if freqs.numel() != head_dim // 2:
        raise ValueError(f"{where}: rope_freqs has {freqs.numel()} values, expected head_dim / 2 = {head_dim // 2}")
    factor = float(freqs.max())
    context = int(original_context or DEFAULT_ORIGINAL_CONTEXT)
    if not math.isfinite(factor) or factor < 1 or abs(float(freqs.min()) - 1) > _RTOL:
        raise ValueError(f"{where}: rope_freqs (from {float(freqs.min()):g} to {factor:g}) are not Llama 3 "
                         "scaling divisors (1 for short wavelengths, the factor for long ones)")
    wavelen = 2 * math.pi / _inv_freq(head_dim, theta, None)
    ramp = (freqs > 1 + _RTOL) & (freqs < factor * (1 - _RTOL))
    candidates = [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0)]  # seen in releases; tried when no ramp is visible
    if int(ramp.sum()) >= 2:
        s = (1 / freqs[ramp] - 1 / factor) / (1 - 1 / factor)
        x = context / wavelen[ramp]
        slope = float((s[-1] - s[0]) / (x[-1] - x[0]))
        low = _nice(-float(s[0] - slope * x[0]) / slope)
        candidates = [(low, _nice(low + 1 / slope))]
    for low, high in candidates:
        scaling = {"rope_type": "llama3", "factor": _nice(factor), "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": context}
        if high > low > 0 and torch.allclose(rope_freqs_for(head_dim, theta, scaling).double(), freqs, rtol=_RTOL,
                                             atol=0):
            return scaling
    raise ValueError(f"{where}: rope_freqs do not follow Llama 3 scaling for any low/high frequency factors "
                     f"(factor {factor:g}, original context {context})")
