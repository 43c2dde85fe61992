"""Training and introspection helpers: gradient checkpointing, init, parameter and FLOP counts,
embedding resizing, memory footprint, backend switching, device/dtype."""

from __future__ import annotations

import pytest
import torch

from llama_core import LlamaForCausalLM, LlamaModel
from tests.conftest import random_model, small_config


def test_gradient_checkpointing_gives_identical_gradients():
    model = random_model().train()
    ids = torch.randint(0, 128, (2, 16))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    handle.remove()
    assert len(calls) == 2  # the layer ran again during backward: activations were recomputed
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_hf_style_initialisation():
    torch.manual_seed(0)
    config = small_config(hidden_size=256, intermediate_size=512, vocab_size=1000, pad_token_id=3,
                          initializer_range=0.05, attention_bias=True)
    model = LlamaForCausalLM(config)
    w = model.model.layers[0].mlp.gate_proj.weight
    assert abs(w.std().item() - 0.05) < 0.003 and abs(w.mean().item()) < 0.003
    assert torch.all(model.model.embed_tokens.weight[3] == 0)  # padding row
    assert torch.all(model.model.layers[0].self_attn.q_proj.bias == 0)
    assert torch.all(model.model.norm.weight == 1)


def test_num_parameters_counts_tied_weights_once():
    untied = LlamaForCausalLM(small_config())
    tied = LlamaForCausalLM(small_config(tie_word_embeddings=True))
    emb = 128 * 64
    assert untied.num_parameters() - tied.num_parameters() == emb
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - emb
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - emb
    tied.model.embed_tokens.weight.requires_grad_(False)
    assert tied.num_parameters(only_trainable=True) == tied.num_parameters() - emb


def test_floating_point_ops_counts_the_matmuls():
    """Forward FLOPs measured by torch's FlopCounterMode equal floating_point_ops(training=False)."""
    from torch.utils.flop_counter import FlopCounterMode

    # eager: the counter sees its matmuls (it does not count the CPU SDPA kernel)
    model = random_model(small_config(tie_word_embeddings=True, attn_implementation="eager"))
    ids = torch.randint(0, 128, (2, 24))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    assert model.floating_point_ops(48, seq_len=24, training=False) == counter.get_total_flops()
    assert model.floating_point_ops(48, seq_len=24) == 3 * counter.get_total_flops()


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings(tied):
    model = random_model(small_config(tie_word_embeddings=tied))
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 128, (1, 8))
    before = model(ids).logits
    new = model.resize_token_embeddings(130, pad_to_multiple_of=64)
    assert new.num_embeddings == 192 and model.config.vocab_size == 192
    assert model.lm_head.weight.shape == (192, 64)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(model.model.embed_tokens.weight[:128], old_emb)
    torch.testing.assert_close(model.model.embed_tokens.weight[150], old_emb.mean(0))
    if not tied:
        torch.testing.assert_close(model.lm_head.weight[:128], old_head)
    torch.testing.assert_close(model(ids).logits[..., :128], before)  # old tokens: unchanged scores
    model.resize_token_embeddings(100)
    assert model.model.embed_tokens.weight.shape == (100, 64) and model.lm_head.weight.shape == (100, 64)


def test_memory_footprint_device_dtype():
    model = random_model(small_config(tie_word_embeddings=True))
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() == 4 * params + buffers
    assert model.get_memory_footprint(return_buffers=False) == 4 * params
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.get_memory_footprint(return_buffers=False) == 2 * params


def test_set_attn_implementation():
    model = random_model()
    model.set_attn_implementation("eager")
    assert model.config.attn_implementation == "eager"
    assert all(layer.self_attn.backend == "eager" for layer in model.model.layers)
    with pytest.raises(ValueError, match="flash"):
        model.set_attn_implementation("flash")


def test_inputs_embeds_equal_input_ids_and_base_model_output():
    model = random_model()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.model.embed_tokens(ids)).logits
        last = model.model(ids).last_hidden_state
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.lm_head(last), a)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    assert isinstance(model.base_model, LlamaModel)


def test_logits_to_keep_and_loss_ignore_index():
    model = random_model()
    ids = torch.randint(0, 128, (2, 9))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full.logits[:, -1:])
    labels = ids.clone()
    labels[:, :4] = -100
    manual = torch.nn.functional.cross_entropy(full.logits[:, 3:-1].reshape(-1, 128), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, manual)


def test_training_step_reduces_loss():
    model = random_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
