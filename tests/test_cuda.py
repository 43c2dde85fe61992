"""GPU checks at real shapes (skipped without CUDA): device placement, bf16 against transformers, a model
split across GPU and CPU, and compiled static-cache decoding."""

from __future__ import annotations

import pytest
import torch

from llama_core import DynamicCache, LlamaForCausalLM, StaticCache
from llama_core.model_io.placement import parse_size
from tests.conftest import small_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def checkpoint_1b(tmp_path_factory):
    """A random model of Llama 3.2 1B's shape (4 of its 16 layers), saved in bf16."""
    path = tmp_path_factory.mktemp("ckpt") / "llama3.2-1b-4l"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM.from_preset("llama3.2-1b", num_hidden_layers=4).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


@torch.no_grad()
def test_fp32_cuda_matches_cpu(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(small_config(hidden_size=256, intermediate_size=512, num_attention_heads=8)).save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 64))
    cpu = LlamaForCausalLM.from_pretrained(tmp_path)(ids).logits
    gpu = LlamaForCausalLM.from_pretrained(tmp_path, device="cuda")
    assert gpu.device.type == "cuda" and gpu.model.rotary_emb.inv_freq.device.type == "cuda"
    torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_real_shape_error_within_transformers(checkpoint_1b, transformers_module):
    ids = torch.randint(0, 128256, (1, 2048), device="cuda")
    reference = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.float64, device="cuda")(ids).logits
    ours = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype="auto", device="cuda")
    assert ours.dtype == torch.bfloat16
    our_err = (ours(ids).logits.double() - reference).abs()
    del ours
    theirs = transformers_module.LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.bfloat16)
    theirs = theirs.to("cuda").eval()
    their_err = (theirs(ids).logits.double() - reference).abs()
    assert our_err.mean() <= 1.25 * their_err.mean(), (our_err.mean(), their_err.mean())
    assert our_err.max() <= 1.25 * their_err.max(), (our_err.max(), their_err.max())


@torch.no_grad()
def test_device_map_split_between_gpu_and_cpu(checkpoint_1b):
    """max_memory forces some decoder layers onto the CPU; results equal the single-device model."""
    whole = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.float32, device="cuda")
    ids = torch.randint(0, 128256, (2, 32), device="cuda")
    want = whole(ids).logits.cpu()
    del whole
    layer_bytes = 4 * 60_821_504  # one 1B-shaped decoder layer in fp32
    embed_bytes = 4 * 128_256 * 2048  # tied: the lm_head shares it
    split = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.float32, device_map="auto",
                                             max_memory={0: int(embed_bytes + 2.5 * layer_bytes), "cpu": "64GB"})
    devices = [layer.input_layernorm.weight.device.type for layer in split.model.layers]
    assert "cuda" in devices and "cpu" in devices, devices
    assert split.model.rotary_emb.inv_freq.device.type == "cuda"
    torch.testing.assert_close(split(ids).logits.cpu(), want, atol=1e-4, rtol=0)
    # incremental decoding through a cache that lives on both devices
    cache = DynamicCache()
    steps = [split(ids[:, :20], past_key_values=cache, use_cache=True).logits]
    steps += [split(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(20, 32)]
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), want, atol=1e-4, rtol=0)
    assert parse_size("2GiB") == 2 << 30


@torch.no_grad()
def test_compiled_static_cache_decode_matches_eager(checkpoint_1b):
    """torch.compile (inductor + CUDA graphs) of a StaticCache decode step equals eager DynamicCache decoding.
    fp32, so the comparison is not drowned in bf16 rounding of near-tied random logits."""
    model = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.float32, device="cuda")
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=64, device="cuda")
    ids = torch.randint(0, 128256, (1, 40), device="cuda")

    def step(token, position):
        return model(token, position_ids=position[None], past_key_values=cache, use_cache=True,
                     cache_position=position).logits

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    got = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
    got += [compiled(ids[:, t:t + 1], torch.tensor([t], device="cuda")).clone() for t in range(8, 40)]
    eager_cache = DynamicCache()
    want = [model(ids[:, :8], past_key_values=eager_cache, use_cache=True).logits]
    want += [model(ids[:, t:t + 1], past_key_values=eager_cache, use_cache=True).logits for t in range(8, 40)]
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-3, rtol=0)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@torch.no_grad()
def test_left_padded_batch_on_cuda_equals_each_row_alone(checkpoint_1b, backend):
    """GQA + boolean padding masks through the CUDA SDPA kernels (fp32, so differences are not rounding)."""
    model = LlamaForCausalLM.from_pretrained(checkpoint_1b, dtype=torch.float32, device="cuda",
                                             attn_implementation=backend)
    lengths = [48, 17, 5]
    rows = [torch.randint(1, 128256, (n,), device="cuda") for n in lengths]
    ids = torch.zeros(3, 48, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 48 - len(r):], mask[i, 48 - len(r):] = r, 1
    batched = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, 48 - len(r):], model(r[None]).logits[0], atol=1e-4, rtol=0)
