"""KV caches and masking invariances: incremental decoding equals the full forward (with every rope type,
including dynamic NTK past the trained length), left padding changes nothing, SDPA equals eager."""

from __future__ import annotations

import pytest
import torch

from llama_core import DynamicCache, LlamaForCausalLM, StaticCache
from tests.conftest import random_model, small_config

ATOL = 1e-5

ROPES = {
    "default": {},
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "dynamic": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8),
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8)),
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)),
}


def make_cache(kind: str, model: LlamaForCausalLM, batch: int, length: int):
    if kind == "dynamic":
        return DynamicCache()
    return StaticCache(model.config, max_batch_size=batch, max_cache_len=length)


def decode_stepwise(model, ids, cache, prefill: int, mask=None):
    """Prefill ``prefill`` tokens, then feed one token at a time; returns logits of every fed position."""
    logits = [model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill],
                    past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1],
                            past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("rope", sorted(ROPES))
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(rope, cache_kind):
    model = random_model(small_config(**ROPES[rope]))
    ids = torch.randint(0, 128, (2, 20))
    cache = make_cache(cache_kind, model, 2, 24)
    stepwise = decode_stepwise(model, ids, cache, prefill=5)
    assert cache.get_seq_length() == 20
    if rope == "dynamic":
        # Within the trained length (8) the rope is plain and everything must agree exactly; past it see
        # test_dynamic_ntk_cache_never_uses_stale_keys.
        torch.testing.assert_close(stepwise[:, :8], model(ids[:, :8]).logits, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(stepwise, model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_dynamic_ntk_cache_never_uses_stale_keys(cache_kind, transformers_module, tmp_path):
    """Dynamic NTK past the trained length: the rope base depends on the current length, so every step
    rotates the whole (un-rotated) key cache with today's base. For a one-layer model, whose cached K/V
    depend on nothing else, step t then equals a full forward of the first t+1 tokens exactly, at every
    step. transformers caches keys rotated with the base of their own step and misses by far more.

    (With more layers, the cached K/V of deeper layers come from hidden states computed under the base in
    force when their token was processed, as in any KV cache; recomputing them is what a cache avoids.)
    """
    model = random_model(small_config(num_hidden_layers=1, **ROPES["dynamic"]))
    ids = torch.randint(0, 128, (2, 24))
    stepwise = decode_stepwise(model, ids, make_cache(cache_kind, model, 2, 24), prefill=3)
    for t in range(2, 24):
        full = model(ids[:, :t + 1]).logits[:, -1]
        torch.testing.assert_close(stepwise[:, t], full, atol=ATOL, rtol=0, msg=lambda m, t=t: f"step {t}: {m}")

    model.save_pretrained(tmp_path)
    ref = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    full = ref(ids).logits[:, -1]
    ref = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path).eval()  # fresh dynamic-rope state
    cache = transformers_module.DynamicCache(config=ref.config)
    ref(ids[:, :3], past_key_values=cache, use_cache=True)
    for t in range(3, 24):
        last = ref(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    assert (last - full).abs().max() > 20 * ATOL  # the reference's stale keys; ours matched to ATOL


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_chunked_prefill_with_cache(cache_kind):
    """Several tokens at once on top of a non-empty cache (the causal mask must be offset by the past)."""
    model = random_model()
    ids = torch.randint(0, 128, (2, 15))
    cache = make_cache(cache_kind, model, 2, 16)
    chunks = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
              for a, b in ((0, 4), (4, 11), (11, 12), (12, 15))]
    torch.testing.assert_close(torch.cat(chunks, 1), model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("rope", ["default", "dynamic"])
@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(backend, rope):
    model = random_model(small_config(attn_implementation=backend, **ROPES[rope]))
    lengths = [14, 9, 3]
    seqs = [torch.randint(3, 128, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    batched = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batched).all()  # padded query rows must not produce NaN
    for i, s in enumerate(seqs):
        alone = model(s[None]).logits[0]
        torch.testing.assert_close(batched[i, width - len(s):], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_left_padded_incremental_decoding(cache_kind):
    """Padded prefill then token-by-token decoding: each row equals decoding it alone (dynamic NTK rope,
    whose per-row frequencies make this the strictest case)."""
    model = random_model(small_config(**ROPES["dynamic"]))
    prompts = [torch.randint(3, 128, (n,)) for n in (7, 3)]
    new = torch.randint(3, 128, (2, 6))
    width = 7
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    cache = make_cache(cache_kind, model, 2, 16)
    batched = decode_stepwise(model, full_ids, cache, prefill=width, mask=full_mask)
    for i, p in enumerate(prompts):
        alone = decode_stepwise(model, torch.cat([p, new[i]])[None], make_cache(cache_kind, model, 1, 16),
                                prefill=len(p))[0]
        torch.testing.assert_close(batched[i, width - len(p):], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", sorted(ROPES))
@torch.no_grad()
def test_sdpa_equals_eager(rope):
    model = random_model(small_config(**ROPES[rope]))
    ids = torch.randint(0, 128, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[mask.bool()], eager[mask.bool()], atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_equals_dynamic_cache_and_keeps_fixed_shapes():
    model = random_model()
    ids = torch.randint(0, 128, (1, 10))
    static = StaticCache(model.config, max_batch_size=1, max_cache_len=12, device="cpu")
    dynamic = DynamicCache()
    a = decode_stepwise(model, ids, static, prefill=4)
    b = decode_stepwise(model, ids, dynamic, prefill=4)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert static.keys[0].shape == (1, 2, 12, 16)
    assert dynamic.keys[0].shape == (1, 2, 10, 16)


@torch.no_grad()
def test_static_cache_reset_and_reuse():
    model = random_model()
    cache = StaticCache(model.config, 1, 8)
    ids = torch.randint(0, 128, (1, 6))
    first = decode_stepwise(model, ids, cache, prefill=2)
    cache.reset()
    assert cache.get_seq_length() == 0
    torch.testing.assert_close(decode_stepwise(model, ids, cache, prefill=3), first, atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_overflow_and_batch_errors_leave_cache_intact():
    model = random_model()
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=6)
    model(torch.randint(0, 128, (1, 4)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_cache_len 6"):
        model(torch.randint(0, 128, (1, 3)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="max_batch_size 1"):
        model(torch.randint(0, 128, (2, 1)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4


def test_attention_mask_must_cover_cached_and_new_tokens():
    model = random_model()
    cache = DynamicCache()
    model(torch.randint(0, 128, (1, 4)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"expected \(batch, cached \+ new tokens\) = \(1, 5\)"):
        model(torch.randint(0, 128, (1, 1)), attention_mask=torch.ones(1, 1), past_key_values=cache)


@torch.no_grad()
def test_cache_reorder_selects_rows():
    model = random_model()
    ids = torch.randint(0, 128, (3, 5))
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 128, (3, 1))
    got = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    want = model(torch.cat([ids[[2, 2, 0]], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_use_cache_returns_a_dynamic_cache():
    model = random_model()
    out = model(torch.randint(0, 128, (1, 3)), use_cache=True)
    assert isinstance(out.past_key_values, DynamicCache) and out.past_key_values.get_seq_length() == 3
    assert model(torch.randint(0, 128, (1, 3))).past_key_values is None


@torch.no_grad()
def test_static_cache_decode_compiles_to_one_graph():
    """A decode step with a StaticCache traces with fullgraph=True (no graph breaks) and is not
    recompiled as the cache fills: shapes and guards stay fixed across steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model()
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=24, device="cpu")
    ids = torch.randint(0, 128, (1, 16))

    def step(token, position):
        return model(token, position_ids=position[None], past_key_values=cache, use_cache=True,
                     cache_position=position).logits

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    logits = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]
    for t in range(4, 16):
        logits.append(compiled(ids[:, t:t + 1], torch.tensor([t])))
    assert counters["stats"]["unique_graphs"] == 1
    assert cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(logits, 1), model(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_reorder_is_in_place_and_selects_rows():
    model = random_model()
    ids = torch.randint(0, 128, (3, 5))
    cache = StaticCache(model.config, max_batch_size=3, max_cache_len=8)
    model(ids, past_key_values=cache, use_cache=True)
    pointers = [t.data_ptr() for t in cache.keys]
    cache.reorder(torch.tensor([2, 2, 0]))
    assert [t.data_ptr() for t in cache.keys] == pointers  # compiled / CUDA graphs keep pointing at them
    nxt = torch.randint(0, 128, (3, 1))
    got = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    want = model(torch.cat([ids[[2, 2, 0]], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
