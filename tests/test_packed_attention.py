"""Packed documents told by restarting position_ids: each backend of modeling.document_attention gives every
document exactly its standalone logits and gradients, the fused paths build no [t, t] tensor, the choice of
backend follows the documented rules, and the result matches transformers' packed-sequence handling."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_core import LlamaForCausalLM
from llama_core.modeling import document_attention as da
from llama_core.train import pack_windows
from tests.conftest import random_model, small_config

TOL = dict(atol=1e-5, rtol=1e-5)
CUDA = torch.cuda.is_available()


def packed_rows() -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """Two windows of 37 tokens cut from a stream of documents, as training packs them: row 0 starts inside
    a document (cut by the left edge) and ends inside another (cut by the right edge); row 1 holds one
    1-token document among others. Returns input_ids, position_ids, and each row's document pieces."""
    lengths = [(12, 5, 9, 3, 14), (6, 1, 20, 11)]
    cuts = [(4, 42), (0, 38)]  # a window of t + 1 = 38 stream tokens per row
    tokens, doc_ids = [], []
    for row_lengths, (first, end) in zip(lengths, cuts, strict=True):
        tokens.append(torch.randint(3, 128, (sum(row_lengths),))[first:end])
        doc_ids.append(torch.cat([torch.full((n,), i) for i, n in enumerate(row_lengths)])[first:end])
    batch = pack_windows(torch.stack(tokens), torch.stack(doc_ids))
    pieces = []
    for r in range(2):
        starts = [*(batch.position_ids[r] == 0).nonzero().flatten().tolist(), batch.input_ids.shape[1]]
        pieces.append([batch.input_ids[r, s:e] for s, e in itertools.pairwise(starts)])
    assert len(pieces[0]) == 5 and len(pieces[0][0]) == 8 and len(pieces[1]) == 4  # left cut, 3+ documents
    return batch.input_ids, batch.position_ids, pieces


def force_backend(monkeypatch, backend: str) -> list[str]:
    """Make the model choose ``backend`` for packed rows; returns the list of choices made (to assert on)."""
    chosen: list[str] = []

    def choose(*args) -> str:
        chosen.append(backend)
        return backend

    monkeypatch.setattr(da, "choose_backend", choose)
    return chosen


def packed_and_alone(model, ids, positions, pieces, grad: bool):
    """Logits (and parameter gradients of a fixed random projection of them) of the packed rows, and the same
    from each document piece run alone."""
    weight = torch.randn(ids.shape[0], ids.shape[1], model.config.vocab_size, device=ids.device)
    results = []
    for alone in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            if alone:
                logits = torch.stack([torch.cat([model(x[None]).logits[0] for x in row]) for row in pieces])
            else:
                logits = model(ids, position_ids=positions).logits
            if grad:
                (logits * weight).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()} if grad else {}))
    return results


@pytest.mark.parametrize("backend", ["segments", "dense", "varlen-emulated"])
def test_packed_rows_equal_documents_alone_logits_and_gradients(monkeypatch, backend):
    model = random_model(small_config(num_hidden_layers=2)).train()  # train(): no dropout configured
    ids, positions, pieces = packed_rows()
    if backend == "varlen-emulated":  # no CUDA here: the real kernel's contract, in PyTorch, on CPU
        monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", emulated_varlen_attn)
        backend = "varlen"
    chosen = force_backend(monkeypatch, backend)
    (packed, packed_grads), (alone, alone_grads) = packed_and_alone(model, ids, positions, pieces, grad=True)
    assert chosen == [backend]  # one choice per forward, for all layers
    torch.testing.assert_close(packed, alone, **TOL)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_eager_implementation_takes_the_dense_mask_and_matches():
    model = random_model(small_config(num_hidden_layers=2, num_key_value_heads=1))
    model.set_attn_implementation("eager")
    ids, positions, pieces = packed_rows()
    (packed, _), (alone, _) = packed_and_alone(model, ids, positions, pieces, grad=False)
    torch.testing.assert_close(packed, alone, **TOL)


@pytest.mark.slow
@pytest.mark.skipif(not da.flex_available(), reason="torch without FlexAttention")
def test_flex_packed_rows_equal_documents_alone(monkeypatch):
    """FlexAttention with the block mask built from document ids (37 tokens: one ragged block). On CPU
    torch has no FlexAttention backward, so gradients are compared on CUDA only."""
    device = "cuda" if CUDA else "cpu"
    model = random_model(small_config(num_hidden_layers=2)).to(device)
    ids, positions, pieces = packed_rows()
    ids, positions = ids.to(device), positions.to(device)
    pieces = [[x.to(device) for x in row] for row in pieces]
    chosen = force_backend(monkeypatch, "flex")
    (packed, packed_grads), (alone, alone_grads) = packed_and_alone(model, ids, positions, pieces, grad=CUDA)
    assert chosen == ["flex"]
    torch.testing.assert_close(packed, alone, atol=1e-4 if CUDA else 1e-5, rtol=1e-4 if CUDA else 1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not da.flex_available(), reason="torch without FlexAttention")
def test_compiled_model_takes_flex_without_graph_breaks(monkeypatch):
    """Under torch.compile (no gradients, CPU) packed rows go to FlexAttention inside the model's graph."""
    from torch._dynamo.utils import counters

    model = random_model(small_config(num_hidden_layers=1))
    ids, positions, _ = packed_rows()
    chosen, choose = [], da.choose_backend
    monkeypatch.setattr(da, "choose_backend", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    counters.clear()
    with torch.no_grad():
        eager = model(ids, position_ids=positions).logits
        compiled = torch.compile(model.forward)(ids, position_ids=positions).logits
    assert chosen == ["segments", "flex"]  # eager mode, then compiled
    torch.testing.assert_close(compiled, eager, **TOL)
    assert not counters["graph_break"], dict(counters["graph_break"])


def emulated_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False, **unused):
    """varlen_attn's documented contract on ``[tokens, heads, d]``: each cu_seqlens span attends alone,
    causally when ``window_size == (-1, 0)``. Checks what our caller must pass."""
    assert q.dim() == 3 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert q.dtype == k.dtype == v.dtype  # the kernel takes one dtype
    assert window_size == (-1, 0) and max_q == max_k and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
    assert int(cu_q[0]) == 0 and int(cu_q[-1]) == q.shape[0]
    out = []
    for s, e in itertools.pairwise(cu_q.tolist()):
        piece = [x[s:e].transpose(0, 1)[None] for x in (q, k, v)]  # [1, heads, length, d]
        out.append(torch.nn.functional.scaled_dot_product_attention(*piece, is_causal=True, scale=scale,
                                                                    enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


def test_varlen_under_autocast_gets_one_dtype(monkeypatch):
    """Under autocast RoPE leaves q and k in fp32 while v is bf16; the kernel gets all three in bf16 and
    agrees with the dense mask run the same way."""
    model = random_model(small_config(num_hidden_layers=2))
    ids, positions, _ = packed_rows()
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", emulated_varlen_attn)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask = da.dense_document_mask(da.packed_document_ids(positions, 2))
        dense = model(ids, attention_mask=mask, position_ids=positions).logits
        chosen = force_backend(monkeypatch, "varlen")
        fused = model(ids, position_ids=positions).logits
    assert chosen == ["varlen"]
    torch.testing.assert_close(fused.float(), dense.float(), atol=0.05, rtol=0.05)  # bf16 rounding only


# ---- no [t, t] tensor on the fused paths -----------------------------------------------------------------

class _CreatedShapes(TorchDispatchMode):
    """Shapes and dtypes of every tensor an op returns while active (forward and autograd backward)."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.created.append((tuple(x.shape), x.dtype))
        return out

    def square(self, t: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Created tensors with a [t, t] trailing pair, or booleans of t * t elements or more."""
        return [(s, d) for s, d in self.created
                if s[-2:] == (t, t) or (d == torch.bool and torch.Size(s).numel() >= t * t)]


def test_segments_training_step_builds_no_t_by_t_tensor():
    model = random_model(small_config(num_hidden_layers=2)).train()
    t = 96  # unlike every model dimension (vocab 128, hidden 64, mlp 112), so a [t, t] shape is attention's
    ids = torch.randint(3, 128, (2, t))
    positions = torch.cat([torch.arange(40), torch.arange(30), torch.arange(26)]).expand(2, t)
    with _CreatedShapes() as fused:
        model(ids, position_ids=positions, labels=ids).loss.backward()
    assert fused.created and fused.square(t) == []
    with _CreatedShapes() as dense:  # the probe sees the mask when one is built
        model(ids, attention_mask=da.dense_document_mask(da.packed_document_ids(positions, 2)))
    assert any(s == (2, 1, t, t) for s, _ in dense.square(t))


def test_flex_block_mask_is_built_without_a_t_by_t_tensor_and_matches_create_block_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    t = 512
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(4), torch.tensor([100, 200, 150, 62])),
                           torch.repeat_interleave(torch.arange(2), torch.tensor([384, 128]))])
    with _CreatedShapes() as probe:
        ours = da.build_document_mask(doc_ids, "flex").block_mask
    assert probe.square(t) == []

    def same_document_causal(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (q >= k)

    ref = flex.create_block_mask(same_document_causal, 2, None, t, t, device="cpu")  # dense evaluation
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert int(ours.full_kv_num_blocks.sum()) > 0  # blocks inside one document skip the mask_mod


# ---- the choice ------------------------------------------------------------------------------------------

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("args, expected", [
    (("eager", GPU, torch.bfloat16, True, 0.0, False), "dense"),  # the reference always sees the mask
    (("sdpa", GPU, torch.bfloat16, True, 0.0, False), "varlen"),
    (("sdpa", GPU, torch.float16, False, 0.0, False), "varlen"),
    (("sdpa", GPU, torch.float32, True, 0.0, False), "flex"),  # FlashAttention has no fp32
    (("sdpa", GPU, torch.bfloat16, True, 0.0, True), "flex"),  # compiling: no data-dependent cu_seqlens
    (("sdpa", GPU, torch.bfloat16, True, 0.1, False), "segments"),  # dropout: neither fused kernel has it
    (("sdpa", GPU, torch.bfloat16, True, 0.1, True), "dense"),
    (("sdpa", CPU, torch.float32, True, 0.0, False), "segments"),  # no FlexAttention backward on CPU
    (("sdpa", CPU, torch.bfloat16, False, 0.0, False), "segments"),
    (("sdpa", CPU, torch.float32, False, 0.0, True), "flex"),
    (("sdpa", CPU, torch.float32, True, 0.0, True), "dense"),
])
def test_choose_backend(monkeypatch, args, expected):
    monkeypatch.setattr(da, "varlen_available", lambda: True)
    monkeypatch.setattr(da, "flex_available", lambda: True)
    assert da.choose_backend(*args) == expected


def test_choose_backend_without_the_kernels(monkeypatch):
    monkeypatch.setattr(da, "varlen_available", lambda: False)
    assert da.choose_backend("sdpa", GPU, torch.bfloat16, True, 0.0, False) == "flex"
    monkeypatch.setattr(da, "flex_available", lambda: False)
    assert da.choose_backend("sdpa", GPU, torch.bfloat16, True, 0.0, False) == "segments"
    assert da.choose_backend("sdpa", GPU, torch.bfloat16, True, 0.0, True) == "dense"


def test_packed_mask_detection_and_errors():
    positions = torch.tensor([[0, 1, 2, 0, 1], [7, 8, 9, 10, 11]])
    assert da.packed_document_ids(positions, 2).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert da.packed_document_ids(positions[:1], 3).shape == (3, 5)  # [1, t] position ids broadcast
    # no restart in any row: plain causal, SDPA's is_causal path
    assert da.packed_attention_mask(positions[1:], 1, "sdpa", torch.float32, 0.0) is None
    mask = da.packed_attention_mask(positions, 2, "sdpa", torch.float32, 0.0)
    assert isinstance(mask, da.DocumentMask) and mask.backend == "segments"
    assert mask.segments == (3, 2, 5)  # document lengths, row 0 then row 1
    assert da.build_document_mask(da.packed_document_ids(positions, 2), "varlen").cu_seqlens.tolist() == [0, 3, 5, 10]
    dense = da.packed_attention_mask(positions, 2, "eager", torch.float32, 0.0)
    assert dense.shape == (2, 1, 5, 5) and dense[0, 0, 4].tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="backend must be one of"):
        da.build_document_mask(positions, "flash")


# ---- transformers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_position_ids_match_transformers(transformers_module, tmp_path, impl):
    """transformers (5.x) reads restarting position_ids without attention_mask or cache as packed documents;
    so do we. Same random weights, fp32."""
    from tests.test_parity import ATOL, BASE, CASES, save_hf_model

    ref = save_hf_model(transformers_module, tmp_path, CASES["gqa-8:2"])
    ref.config._attn_implementation = impl
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
    ids = torch.randint(3, BASE["vocab_size"], (2, 40))
    positions = torch.stack([torch.cat([torch.arange(17), torch.arange(1), torch.arange(22)]),
                             torch.cat([torch.arange(5, 30), torch.arange(15)])])  # row 1 starts mid-document
    with torch.no_grad():
        expected = ref(ids, position_ids=positions, use_cache=False).logits
        got = ours(ids, position_ids=positions).logits
        unpacked = ours(ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (unpacked - expected).abs().max() > 100 * ATOL  # attending across documents would show


def test_varlen_needs_the_causal_window_and_gqa_arguments(monkeypatch):
    """A varlen_attn without window_size / enable_gqa (torch 2.10 lacks both, 2.11 the second) is not chosen:
    the call would fail mid-training. torch 2.13's takes both."""
    import torch.nn.attention.varlen as varlen

    def newer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
              enable_gqa=False):
        return None

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return None

    for fake, usable in [(newer, True), (torch_2_11, False)]:
        monkeypatch.setattr(varlen, "varlen_attn", fake)
        monkeypatch.setattr(da, "_varlen_usable", None)
        assert da.varlen_available() is usable
