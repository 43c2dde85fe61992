"""The CPU one-token decode path (modeling.linear): linear layers written as reductions inside torch.compile.

The reduction is checked against F.linear directly (fp32, bf16, int8 weight-only, bias), its switch (only
compiled, CPU, one row, not with kernels="torch"), and end to end: compiled greedy decoding gives the
eager model's tokens, fp32 exactly, through inductor itself on a tiny model and on SmolLM2's real weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_core import LlamaForCausalLM, quantize
from llama_core.generation import generate
from llama_core.modeling.linear import linear, reduction_linear, uses_cpu_reduction
from llama_core.quant import Int8Linear
from tests.conftest import assets_dir, random_model, small_config

SMOLLM2 = assets_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1, 64), (3, 64), (2, 5, 64)])
def test_reduction_equals_f_linear(dtype, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype), torch.randn(*rows, dtype=dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    out = reduction_linear(x, w, b)
    assert out.dtype == dtype and out.shape == (*rows[:-1], 48)
    # fp32: summation order only; bf16: both round the fp32 sum once
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert torch.allclose(out.float(), ref.to(dtype).float(), rtol=tol, atol=tol * 8)


def test_int8_weight_only_reduction_dequantises_inside():
    layer = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear.from_linear(layer, mode="int8-weight-only")
    x = torch.randn(1, 1, 64)
    ref = q(x)  # the int8 layer's own path
    out = reduction_linear(x, q.weight, q.bias, q.weight_scale)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_switch_is_off_eagerly_with_torch_kernels_and_for_several_rows():
    one, two = torch.randn(1, 1, 8), torch.randn(2, 1, 8)
    assert not uses_cpu_reduction(one, "auto")  # eagerly it would materialise w * x

    @torch.compile(backend="eager", fullgraph=True)
    def decisions(x1, x2):
        flags = [uses_cpu_reduction(x1, "auto"), uses_cpu_reduction(x1, "torch"), uses_cpu_reduction(x2, "auto")]
        return torch.tensor(flags)

    assert decisions(one, two).tolist() == [True, False, False]


def test_other_layer_types_keep_their_own_forward():
    """A W8A8 Int8Linear (and any wrapper, e.g. a LoRA layer) is called as it is."""
    calls = []

    class Wrapped(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    layer = Wrapped(8, 4)
    compiled = torch.compile(lambda x: linear(layer, x, "auto"), backend="eager", fullgraph=True)
    compiled(torch.randn(1, 1, 8))
    assert calls  # not replaced by the reduction: the subclass's forward ran (traced)


def test_compiled_greedy_tokens_equal_eager_through_inductor():
    """Real inductor on a tiny model: the one-row reductions give the eager tokens (fp32, and int8
    weight-only); a padded batch of two (BLAS path) too."""
    model = random_model(small_config(num_hidden_layers=2, vocab_size=256))
    ids = torch.randint(3, 256, (1, 7))
    eager = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=[], compile=True), eager)
    batch = torch.randint(3, 256, (2, 7))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    assert torch.equal(generate(model, batch, mask, max_new_tokens=8, eos_token_id=[], compile=True),
                       generate(model, batch, mask, max_new_tokens=8, eos_token_id=[]))
    quantize(model, "int8-weight-only")
    eager = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=12, eos_token_id=[], compile=True), eager)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} not found (set LLAMA_CORE_ASSETS)")
def test_smollm2_compiled_decode_equals_eager():
    """SmolLM2 in fp32: 48 compiled greedy tokens equal the eager ones (static vs dynamic cache too)."""
    pytest.importorskip("gguf")
    model = LlamaForCausalLM.from_pretrained(SMOLLM2)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 1780, 314, 260,
                         3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    eager = generate(model, ids, max_new_tokens=48, eos_token_id=[])
    assert torch.equal(generate(model, ids, max_new_tokens=48, eos_token_id=[], cache="static"), eager)
    assert torch.equal(generate(model, ids, max_new_tokens=48, eos_token_id=[], compile=True), eager)
