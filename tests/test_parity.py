"""Random-init parity with transformers (fp32, CPU): checkpoints saved by transformers load here and give
the same logits, loss, hidden states and gradients."""

from __future__ import annotations

import json

import pytest
import torch

from llama_core import LlamaConfig, LlamaForCausalLM

ATOL = 1e-4  # fp32 logits, per the numerics contract

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-8:2": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "dynamic-past-max": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=16),
    "dynamic-within-max": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=64),
    "llama3": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "yarn-mscale": dict(rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16,
                                          mscale=0.707, mscale_all_dim=1.0, beta_fast=16, beta_slow=2)),
    "tied": dict(tie_word_embeddings=True),
    "head-dim-32": dict(head_dim=32),
    "bias": dict(attention_bias=True, mlp_bias=True),
}
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def save_hf_model(transformers, tmp_path, fields, legacy_keys=False, seed=0):
    """Build a random transformers model, save it, optionally rewrite config.json with v4-style keys."""
    torch.manual_seed(seed)
    fields = {**BASE, **fields}
    rope_scaling = fields.pop("rope_scaling", None)
    theta = fields.pop("rope_theta", 10000.0)
    cfg = transformers.LlamaConfig(**fields, rope_parameters={"rope_type": "default", **(rope_scaling or {}),
                                                              "rope_theta": theta})
    cfg._attn_implementation = "eager"  # the reference: explicit softmax
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or skipped one shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    if legacy_keys:
        data = json.loads((tmp_path / "config.json").read_text())
        params = data.pop("rope_parameters")
        data["rope_theta"] = params.pop("rope_theta")
        if params["rope_type"] != "default":  # v4 files use "type" in older exports
            params["type"] = params.pop("rope_type")
            data["rope_scaling"] = params
        data["torch_dtype"] = data.pop("dtype", "float32")
        (tmp_path / "config.json").write_text(json.dumps(data))
    return model


@pytest.mark.parametrize("legacy_keys", [False, True], ids=["v5-keys", "v4-keys"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_loss_hidden_states_and_gradients_match_transformers(transformers_module, tmp_path, case,
                                                                     legacy_keys):
    ref = save_hf_model(transformers_module, tmp_path, CASES[case], legacy_keys)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert ours.config.rope_type == ref.config.rope_parameters["rope_type"]
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))  # 40 > 16: the scaled rope regimes are exercised

    ref_out = ref(ids, labels=ids, output_hidden_states=True)
    out = ours(ids, labels=ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref_out.hidden_states) == BASE["num_hidden_layers"] + 1
    for mine, theirs in zip(out.hidden_states, ref_out.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)

    out.loss.backward()
    ref_out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_eager_backend_matches_transformers_eager(transformers_module, tmp_path):
    ref = save_hf_model(transformers_module, tmp_path, CASES["gqa-8:2"])
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(0, BASE["vocab_size"], (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)


def test_padded_batch_matches_transformers_on_real_tokens(transformers_module, tmp_path):
    """Left padding with a 2-D mask: logits at real tokens agree with transformers (positions from the mask)."""
    ref = save_hf_model(transformers_module, tmp_path, CASES["llama3"])
    ref.config._attn_implementation = "sdpa"
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, BASE["vocab_size"], (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)


def test_dynamic_rope_is_stateless_unlike_transformers(transformers_module, tmp_path):
    """transformers' dynamic NTK keeps the longest length it has seen, so a short input after a long one
    gets different logits than on a fresh model. Ours depends only on the input."""
    save_hf_model(transformers_module, tmp_path, CASES["dynamic-past-max"])
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    short = torch.randint(0, BASE["vocab_size"], (1, 24))
    with torch.no_grad():
        first = ours(short).logits
        ours(torch.randint(0, BASE["vocab_size"], (1, 60)))
        assert torch.equal(ours(short).logits, first)


@pytest.mark.parametrize("case", ["gqa-8:2", "tied", "llama3", "bias", "head-dim-32", "dynamic-past-max"])
def test_round_trip_ours_transformers_ours(transformers_module, tmp_path, case):
    """Our sharded save loads in transformers with the same logits; transformers' re-save loads back
    here bit for bit."""
    fields = {**BASE, **CASES[case]}
    torch.manual_seed(0)
    ours = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    ref = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)
    ref.save_pretrained(tmp_path / "theirs")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "theirs")
    assert back.config.tie_word_embeddings == ours.config.tie_word_embeddings
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
