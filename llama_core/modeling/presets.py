"""Named configs of known Llama releases, for random-init models in tests, benchmarks and training.

The numbers are those of the released config.json files; weights are never downloaded. Plain field dicts
(no LlamaConfig here), so ``LlamaConfig.from_preset`` builds them without an import circle.
"""

from __future__ import annotations

from typing import Any

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_id=128001)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009],
                rope_scaling=_LLAMA31_ROPE)
_LLAMA32 = dict(_LLAMA31, tie_word_embeddings=True, rope_scaling=dict(_LLAMA31_ROPE, factor=32.0))

PRESETS: dict[str, dict[str, Any]] = {
    # A few-thousand-parameter model for unit tests: GQA 4:2, every code path, runs in milliseconds.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    # Not a release: a ~100M Llama-3.2-style shape (GQA 3:1, tied embeddings, Llama 2's 32k vocabulary)
    # sized for CPU benchmarks, where a 1B model takes minutes per measurement. 100,092,672 parameters.
    "synthetic-100m": dict(_LLAMA2, max_position_embeddings=2048, hidden_size=768, intermediate_size=2048,
                           num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                           tie_word_embeddings=True),
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "llama3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8),
    "llama3.2-1b": dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama3.2-3b": dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_fields(name: str) -> dict[str, Any]:
    """The config fields of the named preset (case-insensitive), or a ValueError listing the known names."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return dict(PRESETS[key])
