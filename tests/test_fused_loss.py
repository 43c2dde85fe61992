"""The chunked (fused) lm_head cross entropy: same loss and gradients as the plain path, never the full logits."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama_core.cli.train import add_arguments
from llama_core.modeling.fused_loss import default_chunk_size, fused_linear_cross_entropy
from llama_core.train.config import TrainConfig
from llama_core.train.data import pack_windows
from llama_core.train.loop import micro_step_loss
from tests.conftest import random_model, small_config

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: chunking reorders sums only


def _ids_and_labels(b: int = 2, t: int = 11, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (b, t))
    labels = ids.clone()
    labels[0, 3], labels[1, :4], labels[1, -1] = -100, -100, -100  # ignored positions, one at a row's end
    return ids, labels


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_and_gradients_equal_the_plain_path(tied):
    model = random_model(small_config(tie_word_embeddings=tied)).train()
    ids, labels = _ids_and_labels()
    plain = model(ids, labels=labels)
    plain.loss.backward()
    expected = _grads(model)
    fused = model(ids, labels=labels, skip_logits=True)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, **TOL)
    fused.loss.backward()
    got = _grads(model)
    for name, grad in expected.items():  # embeddings (tied: lm_head's gradient lands there), lm_head, layers
        torch.testing.assert_close(got[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("chunk", [1, 5, 16, 22, 64, None])  # 5 does not divide the 22 tokens; 64 exceeds them
def test_chunk_sizes_give_the_same_loss_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 11, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 300, (2, 11))
    targets[0, :5] = -100
    plain = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    dh, dw = torch.autograd.grad(plain * 3.0, (hidden, weight))  # a non-unit incoming gradient
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    torch.testing.assert_close(fused, plain, **TOL)
    fh, fw = torch.autograd.grad(fused * 3.0, (hidden, weight))
    torch.testing.assert_close(fh, dh, **TOL)
    torch.testing.assert_close(fw, dw, **TOL)


def test_shift_labels_and_num_items_in_batch_match_the_plain_path():
    """The training loop's form: targets already aligned, summed (num_items_in_batch=1) or divided by a count."""
    model = random_model()
    ids, labels = _ids_and_labels()
    targets = torch.randint(0, 128, ids.shape)
    targets[0, 2] = -100
    for n in (1, 7):
        plain = model(ids, shift_labels=targets, num_items_in_batch=n).loss
        fused = model(ids, shift_labels=targets, num_items_in_batch=n, skip_logits=True).loss
        torch.testing.assert_close(fused, plain, **TOL)
    shifted = model(ids, shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:], skip_logits=True).loss
    torch.testing.assert_close(shifted, model(ids, labels=labels).loss, **TOL)  # labels are shifted inside


def test_all_labels_ignored_gives_what_the_plain_path_gives():
    """F.cross_entropy's mean over no targets is NaN, with zero gradients; the fused loss matches both."""
    model = random_model().train()
    ids = torch.randint(0, 128, (2, 6))
    labels = torch.full_like(ids, -100)
    plain = model(ids, labels=labels).loss
    plain.backward()
    expected = _grads(model)
    fused = model(ids, labels=labels, skip_logits=True).loss
    fused.backward()
    assert plain.isnan() and fused.isnan()
    for name, grad in _grads(model).items():
        assert torch.equal(grad, expected[name]), name
    summed = model(ids, labels=labels, skip_logits=True, num_items_in_batch=1).loss
    assert summed.item() == 0.0


def test_bf16_weights_and_autocast_follow_the_plain_path():
    """Logits in bf16 (as the plain lm_head gives them), log-softmax in fp32: the loss agrees to bf16 matmul
    rounding and gradients come back in the parameters' dtypes."""
    ids, labels = _ids_and_labels()
    bf16 = random_model().to(torch.bfloat16).train()
    plain, fused = bf16(ids, labels=labels).loss, bf16(ids, labels=labels, skip_logits=True).loss
    assert plain.dtype == fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=0)
    fused.backward()
    assert bf16.lm_head.weight.grad.dtype == torch.bfloat16
    model = random_model().train()
    reference = model(ids, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fused = model(ids, labels=labels).loss, model(ids, labels=labels, skip_logits=True).loss
    assert fused.item() != reference.item()  # the bf16 matmul really ran ...
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=0)  # ... as in the plain path
    fused.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_clear_errors():
    model = random_model()
    ids, labels = _ids_and_labels()
    with pytest.raises(ValueError, match="skip_logits=True returns only the loss, so it needs labels"):
        model(ids, skip_logits=True)
    with pytest.raises(ValueError, match=r"labels .* or shift_labels .*not both"):
        model(ids, labels=labels, shift_labels=labels, skip_logits=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=labels, skip_logits=True, logits_to_keep=1)
    bad = labels.clone()
    bad[0, 5] = 128
    with pytest.raises(ValueError, match="target id 128 is outside the vocabulary"):
        model(ids, labels=bad, skip_logits=True)


def test_weight_only_int8_head_gives_the_plain_path_loss_and_w8a8_is_a_clear_error():
    """Fine-tuning adapters on an int8 checkpoint: the frozen int8 head is read dequantised, as its forward does."""
    from llama_core.quant import quantize

    model = quantize(random_model(), "int8-weight-only")
    ids, labels = _ids_and_labels()
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    plain = model(inputs_embeds=embeds, labels=labels).loss
    (plain_grad,) = torch.autograd.grad(plain, embeds)
    fused = model(inputs_embeds=embeds, labels=labels, skip_logits=True).loss
    (fused_grad,) = torch.autograd.grad(fused, embeds)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-7)
    w8a8 = quantize(random_model(), "int8", skip=())
    with pytest.raises(TypeError, match=r"lm_head is Int8Linear \(int8\): pass skip_logits=False"):
        w8a8(ids, labels=labels, skip_logits=True)


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor any op creates (views excluded: they allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and not any(a.alias_info for a in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocab_tensor_is_ever_allocated():
    """Loss and backward on 4096 tokens x 4096 vocabulary: the plain path allocates the full 16M-element logits
    (and their softmax and gradient); the fused path nothing above 1/8 of that (its largest: one chunk's
    logits, 256 x 4096)."""
    tokens, vocab, hidden_size = 4096, 4096, 32
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    with _LargestAllocation() as plain:
        F.cross_entropy(F.linear(hidden, weight).float(), targets).backward()
    with _LargestAllocation() as fused:
        fused_linear_cross_entropy(hidden, weight, targets).backward()
    assert plain.largest >= tokens * vocab  # the probe sees the plain path's logits
    assert fused.largest <= tokens * vocab // 8, (fused.largest, default_chunk_size(tokens, vocab, hidden_size))


def test_training_uses_it_by_default_with_the_same_loss_and_gradients():
    tokens = torch.randint(3, 128, (2, 17))
    doc_ids = torch.tensor([[0] * 9 + [1] * 8, [2] * 17])
    batch = pack_windows(tokens, doc_ids)
    model = random_model().train()
    plain = micro_step_loss(model, batch, fused=False)
    plain.backward()
    expected = _grads(model)
    fused = micro_step_loss(model, batch)
    torch.testing.assert_close(fused, plain, **TOL)
    fused.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], **TOL, msg=name)
    assert TrainConfig(data="", output_dir="").fused_loss is True
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--data", "d", "--preset", "tiny", "--output-dir", "o"]
    assert parser.parse_args(base).fused_loss is True
    assert parser.parse_args([*base, "--no-fused-loss"]).fused_loss is False
