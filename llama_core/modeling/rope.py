"""Rotary position embeddings: one pure function per scaling type, plus the module that applies them.

Each entry of ``ROPE_FUNCTIONS`` maps ``(head_dim, rope_theta, scaling, max_position_embeddings, seq_len)``
to ``(inv_freq, attention_scaling)``: fp32 inverse frequencies ``[head_dim // 2]`` (or ``[batch, head_dim // 2]``
for dynamic scaling with per-row lengths) and a factor multiplied into cos/sin (YaRN's mscale; 1.0 elsewhere).
Formulas follow the papers and transformers' ``modeling_rope_utils`` (the parity reference), written with the
same operations in the same order so fp32 results agree bit for bit where possible.

Numerics: angles ``position * inv_freq`` are always computed in fp32 and cos/sin are cast to the activation
dtype only at the end (bf16 angles lose whole radians at long context). Layout is rotate-half (HF);
Meta's interleaved layout exists only in checkpoints_convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import LlamaConfig

RopeFunction = Callable[..., tuple[Tensor, float]]


def _base_inv_freq(head_dim: int, theta: float | Tensor) -> Tensor:
    # 1 / theta^(2i/d), i = 0 .. d/2-1, in fp32.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def default_rope(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int,
                 seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """Plain RoPE (Su et al. 2021)."""
    return _base_inv_freq(head_dim, theta), 1.0


def linear_rope(head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int,
                seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """Position interpolation (Chen et al. 2023): every frequency divided by ``factor``."""
    return _base_inv_freq(head_dim, theta) / scaling["factor"], 1.0


def dynamic_rope(head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int,
                 seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """Dynamic NTK scaling: the base grows with the current sequence length once it passes the trained one.

    ``seq_len`` is a ``[batch]`` tensor of per-row lengths (max position + 1); the result is then
    ``[batch, head_dim // 2]``. Rows no longer than ``max_position_embeddings`` get the plain frequencies.
    """
    if seq_len is None:
        return _base_inv_freq(head_dim, theta), 1.0
    factor = scaling["factor"]
    limit = torch.tensor(max_position_embeddings, dtype=seq_len.dtype, device=seq_len.device)
    length = torch.maximum(seq_len, limit)
    # Same expression (and fp32 evaluation order) as transformers' _compute_dynamic_ntk_parameters.
    base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=seq_len.device).to(torch.float32) / head_dim
    return 1.0 / (base[:, None].to(torch.float32) ** exponents), 1.0


def llama3_rope(head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int,
                seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """Llama 3.1 / 3.2: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between."""
    inv_freq = _base_inv_freq(head_dim, theta)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def yarn_rope(head_dim: int, theta: float, scaling: dict[str, Any], max_position_embeddings: int,
              seq_len: Tensor | None = None) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature (mscale)."""
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings") or max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes ``num_rotations`` turns over the original context.
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


ROPE_FUNCTIONS: dict[str, RopeFunction] = {
    "default": default_rope,
    "linear": linear_rope,
    "dynamic": dynamic_rope,
    "llama3": llama3_rope,
    "yarn": yarn_rope,
}


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by angles given as ``cos/sin [batch, seq, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


@dataclass
class RopeAngles:
    """What every attention layer needs to rotate its queries and keys in one forward.

    ``cos/sin [batch, seq, head_dim]`` rotate the current tokens. ``key_cos/key_sin [batch, cache_len, head_dim]``
    are set only for dynamic NTK scaling with a KV cache: its frequencies depend on the current length, so
    keys are cached un-rotated and the whole cache is rotated with the current frequencies after each read.
    """

    cos: Tensor
    sin: Tensor
    key_cos: Tensor | None = None
    key_sin: Tensor | None = None
    # What the Triton rope kernel takes instead of cos/sin (it computes the angles itself, in fp32).
    position_ids: Tensor | None = None  # [batch, seq]
    inv_freq: Tensor | None = None  # [head_dim // 2] or [batch, head_dim // 2]
    scaling: float = 1.0

    def to(self, device: torch.device) -> RopeAngles:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RopeAngles(move(self.cos), move(self.sin), move(self.key_cos), move(self.key_sin),
                          move(self.position_ids), move(self.inv_freq), self.scaling)


class RotaryEmbedding(nn.Module):
    """Turns position ids into cos/sin tables for the model's rope type."""

    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.rope_type = config.rope_type
        self.max_position_embeddings = config.max_position_embeddings
        self.rope_fn = ROPE_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_fn(
            self.head_dim, self.theta, self.scaling, self.max_position_embeddings
        )
        # Not persistent: derived from the config, never stored in checkpoints.
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    @property
    def is_dynamic(self) -> bool:
        return self.rope_type == "dynamic"

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute inv_freq on ``device`` (after building the model on the meta device)."""
        inv_freq, _ = self.rope_fn(self.head_dim, self.theta, self.scaling, self.max_position_embeddings)
        self.inv_freq = inv_freq.to(device)

    def frequencies(self, position_ids: Tensor) -> Tensor:
        """inv_freq for these positions: ``[head_dim // 2]``, or ``[batch, head_dim // 2]`` when dynamic."""
        if not self.is_dynamic:
            return self.inv_freq
        # Per-row length, so each row of a left-padded batch sees the frequencies it would see alone.
        seq_len = position_ids.max(dim=-1).values + 1  # [batch]
        scaled, _ = self.rope_fn(self.head_dim, self.theta, self.scaling, self.max_position_embeddings, seq_len)
        # Within the trained length the plain frequencies are used exactly (not a rounding-off recomputation).
        within = (seq_len <= self.max_position_embeddings)[:, None]
        return torch.where(within, self.inv_freq, scaled.to(self.inv_freq.device))

    def cos_sin(self, position_ids: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin ``[batch, seq, head_dim]`` in ``dtype``, computed in fp32."""
        if inv_freq.dim() == 1:
            inv_freq = inv_freq[None, :]
        freqs = position_ids[..., None].float() * inv_freq[:, None, :].float()  # [batch, seq, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def forward(self, position_ids: Tensor, dtype: torch.dtype, key_positions: Tensor | None = None) -> RopeAngles:
        inv_freq = self.frequencies(position_ids)
        cos, sin = self.cos_sin(position_ids, inv_freq, dtype)
        key_cos = key_sin = None
        if key_positions is not None:
            key_cos, key_sin = self.cos_sin(key_positions, inv_freq, dtype)
        return RopeAngles(cos, sin, key_cos, key_sin, position_ids, inv_freq, self.attention_scaling)
