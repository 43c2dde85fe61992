"""The model with Triton kernels (kernels="triton") equals the torch path: logits and gradients, every rope
type, with a cache, and under torch.compile without graph breaks. On CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1); "auto" picks them only on CUDA."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must be set before triton.jit decorates the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from llama_core import DynamicCache, LlamaForCausalLM
from tests.conftest import small_config

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROPES = {
    "default": {},
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8)),
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)),
    "dynamic": dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8),
}


def pair(**fields):
    torch.manual_seed(0)
    torch_model = LlamaForCausalLM(small_config(kernels="torch", **fields)).to(DEVICE)
    triton_model = LlamaForCausalLM(small_config(**fields), kernels="triton").to(DEVICE)
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_logits_and_gradients_equal_the_torch_path(rope):
    ref, tri = pair(**ROPES[rope])
    ids = torch.randint(0, 128, (2, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: per-row positions reach the rope kernel
    a, b = ref(ids, attention_mask=mask, labels=ids), tri(ids, attention_mask=mask, labels=ids)
    real = mask.bool()
    torch.testing.assert_close(b.logits[real], a.logits[real], atol=1e-4, rtol=0)
    a.loss.backward()
    b.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_the_kernels_really_ran(monkeypatch):
    """kernels="triton" goes through the Triton ops; "torch" and (on CPU) "auto" never touch them."""
    import kernels.rms_norm
    import kernels.rope

    calls = []
    for module, name in ((kernels.rms_norm, "rms_norm"), (kernels.rope, "rope")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    ref, tri = pair()
    ids = torch.randint(0, 128, (1, 5), device=DEVICE)
    with torch.no_grad():
        tri(ids)
        assert calls.count("rms_norm") == 5 and calls.count("rope") == 2  # 2 per layer + final; 1 per layer
        calls.clear()
        ref(ids)
        if DEVICE == "cpu":
            tri.set_kernels("auto")
            tri(ids)
    assert calls == []
    with pytest.raises(ValueError, match="kernels"):
        tri.set_kernels("cuda")


@torch.no_grad()
def test_cached_decoding_with_kernels():
    ref, tri = pair()
    ids = torch.randint(0, 128, (2, 9), device=DEVICE)
    cache = DynamicCache()
    steps = [tri(ids[:, :4], past_key_values=cache, use_cache=True).logits]
    steps += [tri(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), ref(ids).logits, atol=1e-4, rtol=0)


def test_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, tri = pair()
    ids = torch.randint(0, 128, (2, 6), device=DEVICE)
    compiled = torch.compile(lambda x: tri(x, labels=x).loss, backend="eager", fullgraph=True)
    loss = compiled(ids)
    loss.backward()
    torch.testing.assert_close(loss, ref(ids, labels=ids).loss, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


def test_from_pretrained_takes_kernels(tmp_path):
    ref, _ = pair()
    ref.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, kernels="triton")
    assert loaded.config.kernels == "triton" and loaded.model.norm.kernels == "triton"
    assert "kernels" not in (tmp_path / "config.json").read_text()  # a runtime choice, never saved


def test_auto_choice():
    """"auto": Triton on CUDA for prefill/training-sized tensors or when compiling; eager one-token
    decoding keeps PyTorch ops (each custom-op call costs host time); never on CPU."""
    from kernels._runtime import AUTO_MIN_ELEMENTS, auto_prefers_triton

    assert auto_prefers_triton("cuda", AUTO_MIN_ELEMENTS, compiling=False)
    assert auto_prefers_triton("cuda", 4096, compiling=True)
    assert not auto_prefers_triton("cuda", 4096, compiling=False)
    assert not auto_prefers_triton("cpu", 10 * AUTO_MIN_ELEMENTS, compiling=True)
