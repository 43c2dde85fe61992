"""bf16 accuracy: our error against an fp64 forward is no worse than transformers' own bf16 error on the
same weights and input (ratio <= 1.25, per the numerics contract)."""

from __future__ import annotations

import pytest
import torch

from llama_core import LlamaForCausalLM
from tests.conftest import small_config

CONFIGS = {
    "gqa": {},
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0, original_max_position_embeddings=16)),
    "yarn-tied": dict(tie_word_embeddings=True, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                   original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_bf16_error_within_transformers_bf16_error(transformers_module, tmp_path, name, backend):
    torch.manual_seed(0)
    config = small_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=256,
                          max_position_embeddings=256, **CONFIGS[name])
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 64))
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)(ids).logits

    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation=backend)
    theirs = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                                  attn_implementation=backend).eval()
    assert ours.dtype == torch.bfloat16
    our_err = (ours(ids).logits.double() - reference).abs()
    their_err = (theirs(ids).logits.double() - reference).abs()
    assert our_err.mean() <= 1.25 * their_err.mean(), (our_err.mean(), their_err.mean())
    assert our_err.max() <= 1.25 * their_err.max(), (our_err.max(), their_err.max())
