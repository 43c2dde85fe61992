"""llama2.c checkpoints (v0 legacy, v1 fp32, v2 Q8_0): round trips through a test-only writer, header and size
errors, and the real stories260K model, checked against its known greedy story and against an independent
forward pass that uses Meta's interleaved RoPE on the file's own (unpermuted) tensors and freq_cis tables."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints_convert.llama2c import read_llama2c
from checkpoints_convert.permute import half_to_interleaved, interleaved_to_half
from llama_core import DynamicCache, LlamaConfig, LlamaForCausalLM
from tests.conftest import assets_dir, random_model, small_config

MAGIC = 0x616B3432
GROUP = 32
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
         "she saw a big, red ball. She wanted to play with it, but it was too high.")
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 95, 0, 40, 3, 3, 71]])


# ---------------------------------------------------------------------------------------------- writer
def quantize_q80(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Karpathy's Q8_0: symmetric int8 per group of ``group_size`` values, scale = max|w| / 127."""
    w = w.float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def dequantize_q80(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (q.float() * scale[:, None]).reshape(shape)


def llama2c_tensors(sd: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, list[torch.Tensor]]:
    """The state dict in llama2.c's groups and layout (q/k rows back to Meta's interleaved order)."""
    c = config

    def layers(key: str) -> list[torch.Tensor]:
        return [sd[f"model.layers.{i}.{key}.weight"] for i in range(c.num_hidden_layers)]

    return dict(
        emb=[sd["model.embed_tokens.weight"]], att_norm=layers("input_layernorm"),
        ffn_norm=layers("post_attention_layernorm"), norm=[sd["model.norm.weight"]],
        wq=[half_to_interleaved(w, c.num_attention_heads) for w in layers("self_attn.q_proj")],
        wk=[half_to_interleaved(w, c.num_key_value_heads) for w in layers("self_attn.k_proj")],
        wv=layers("self_attn.v_proj"), wo=layers("self_attn.o_proj"), w1=layers("mlp.gate_proj"),
        w2=layers("mlp.down_proj"), w3=layers("mlp.up_proj"),
        cls=[] if c.tie_word_embeddings else [sd["lm_head.weight"]],
    )


def write_llama2c(path: Path, sd: dict[str, torch.Tensor], config: LlamaConfig, version: int,
                  group_size: int = GROUP) -> Path:
    """Write ``sd`` (HF names and layout) the way llama2.c's export.py writes version 0, 1 or 2."""
    c, t = config, llama2c_tensors(sd, config)
    shared = c.tie_word_embeddings
    head_size = c.hidden_size // c.num_attention_heads
    params = [c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
              c.num_key_value_heads, c.vocab_size, c.max_position_embeddings]
    out = bytearray()

    def f32(tensors: list[torch.Tensor]) -> None:
        for w in tensors:
            out.extend(w.detach().float().contiguous().numpy().tobytes())

    matrices = [*t["wq"], *t["wk"], *t["wv"], *t["wo"], *t["w1"], *t["w2"], *t["w3"]]
    if version == 0:
        params[5] = c.vocab_size if shared else -c.vocab_size
        out.extend(struct.pack("<7i", *params))
        f32([*t["emb"], *t["att_norm"], *t["wq"], *t["wk"], *t["wv"], *t["wo"], *t["ffn_norm"], *t["w1"],
             *t["w2"], *t["w3"], *t["norm"]])
        freqs = 1.0 / 10000.0 ** (torch.arange(0, head_size, 2).float() / head_size)
        angles = torch.outer(torch.arange(c.max_position_embeddings).float(), freqs)
        f32([torch.cos(angles), torch.sin(angles), *t["cls"]])
    else:
        out.extend(struct.pack("<Ii7iB", MAGIC, version, *params, int(shared)))
        if version == 2:
            out.extend(struct.pack("<i", group_size))
        out.extend(b"\0" * (256 - len(out)))
        f32([*t["att_norm"], *t["ffn_norm"], *t["norm"]])
        if version == 1:
            f32([*t["emb"], *matrices, *t["cls"]])
        else:
            for w in [*t["emb"], *matrices, *t["cls"]]:  # int8 values, then that tensor's scales
                q, scale = quantize_q80(w, group_size)
                out.extend(q.numpy().tobytes())
                f32([scale])
    path.write_bytes(bytes(out))
    return path


# ---------------------------------------------------------------------------------------------- helpers
def model_config(tied: bool) -> LlamaConfig:
    return small_config(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=176, num_hidden_layers=2, max_position_embeddings=32,
                        tie_word_embeddings=tied)


def original(tied: bool) -> LlamaForCausalLM:
    """A random model whose norms are not all ones either, so a swapped norm would show."""
    model = random_model(model_config(tied))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(source, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A model holding the streamed tensors; only a tied lm_head may be missing (it shares the embedding)."""
    model = LlamaForCausalLM(source.config, init=False).to(dtype).eval()
    missing, unexpected = model.load_state_dict(dict(source.stream()), strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if source.config.tie_word_embeddings else [])
    assert model.lm_head.weight is model.model.embed_tokens.weight or not source.config.tie_word_embeddings
    return model


def expected_names(sd: dict[str, torch.Tensor], tied: bool) -> list[str]:
    return [k for k in sd if not (tied and k == "lm_head.weight")]


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("version", [0, 1])
def test_fp32_round_trip(tmp_path, version, tied):
    model = original(tied)
    sd = model.state_dict()
    path = write_llama2c(tmp_path / "m.bin", sd, model.config, version)
    before = sha(path)
    source = read_llama2c(path)

    c = source.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.max_position_embeddings) == (96, 64, 176, 2, 4, 2, 16, 32)
    assert (c.rms_norm_eps, c.rope_theta, c.rope_scaling, c.tie_word_embeddings) == (1e-5, 10000.0, None, tied)
    assert (c.bos_token_id, c.eos_token_id, c.dtype) == (1, 2, "float32")
    assert f"v{version}" in source.description and str(path) in source.description

    names = expected_names(sd, tied)
    assert list(source.specs) == names  # llama_core's own state-dict order
    streamed = list(source.stream())
    assert [n for n, _ in streamed] == names
    for name, tensor in streamed:
        assert source.specs[name].shape == tuple(tensor.shape) and source.specs[name].dtype == tensor.dtype
        assert torch.equal(tensor, sd[name]), name
        assert tensor.untyped_storage().resizable(), name  # owns its memory: not a view of the file's map
    assert source.total_bytes() == sum(sd[n].numel() * 4 for n in names) == path.stat().st_size - (
        28 + 4 * 32 * 16 if version == 0 else 256)

    with torch.no_grad():
        torch.testing.assert_close(build(source)(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert sha(path) == before


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_q80_round_trip(tmp_path, tied):
    model = original(tied)
    sd = model.state_dict()
    path = write_llama2c(tmp_path / "q.bin", sd, model.config, 2)
    before = sha(path)
    source = read_llama2c(path)
    assert source.config.tie_word_embeddings is tied and source.description.startswith("llama2.c v2")
    names = expected_names(sd, tied)
    assert list(source.specs) == names

    reference = {}  # what llama2.c's runq dequantises to, mapped back to HF layout
    for name, tensor in source.stream():
        w = sd[name]
        if w.ndim == 1:  # norms stay fp32
            assert torch.equal(tensor, w), name
            continue
        heads = 4 if "q_proj" in name else 2 if "k_proj" in name else 0
        meta = half_to_interleaved(w, heads) if heads else w
        deq = dequantize_q80(*quantize_q80(meta, GROUP), w.shape)
        reference[name] = interleaved_to_half(deq, heads) if heads else deq
        assert torch.equal(tensor, reference[name]), name
        # rounding to the nearest step of max|group| / 127 errs by at most half a step
        bound = w.abs().reshape(-1, GROUP).max(dim=1).values / 127 / 2
        assert ((tensor - w).reshape(-1, GROUP).abs() <= bound[:, None] * (1 + 1e-5) + 1e-9).all(), name

    loaded = build(source)
    exact = model_config(tied)
    dequantised = LlamaForCausalLM(exact, init=False).eval()
    dequantised.load_state_dict({**sd, **reference, **({"lm_head.weight": reference["model.embed_tokens.weight"]}
                                                     if tied else {})})
    with torch.no_grad():
        got = loaded(IDS).logits
        torch.testing.assert_close(got, dequantised(IDS).logits, rtol=0, atol=0)
        torch.testing.assert_close(got, model(IDS).logits, rtol=0, atol=3e-2)  # quantisation noise only
    assert sha(path) == before


def test_dtype_and_repeated_streams(tmp_path):
    model = original(False)
    sd = model.state_dict()
    path = write_llama2c(tmp_path / "m.bin", sd, model.config, 1)
    source = read_llama2c(path, dtype=torch.bfloat16)
    assert source.config.dtype == "bfloat16"
    assert all(s.dtype == torch.bfloat16 for s in source.specs.values())
    first = dict(source.stream())
    for name, tensor in first.items():
        assert torch.equal(tensor, sd[name].to(torch.bfloat16)), name
    # Each call maps the file afresh, and what it yields owns its memory: scribbling on it changes nothing.
    for tensor in first.values():
        tensor.zero_()
    second = dict(source.stream())
    assert all(torch.equal(second[n], sd[n].to(torch.bfloat16)) for n in second)

    with pytest.raises(ValueError, match="floating-point"):
        read_llama2c(path, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------- errors
def _v1_bytes(tmp_path) -> bytes:
    model = original(True)
    return write_llama2c(tmp_path / "good.bin", model.state_dict(), model.config, 1).read_bytes()


def _v0_bytes(tmp_path) -> bytes:
    model = original(False)
    return write_llama2c(tmp_path / "good0.bin", model.state_dict(), model.config, 0).read_bytes()


def _with_int(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<i", value) + data[offset + 4:]


CORRUPTIONS = {
    "truncated": (lambda v1, v0: v1[:-10], r"truncated"),
    "truncated-v0": (lambda v1, v0: v0[:-4 * 64], r"truncated"),
    "trailing": (lambda v1, v0: v1 + b"garbage!", r"8 trailing bytes"),
    "trailing-v0": (lambda v1, v0: v0 + b"\0" * 4, r"4 trailing bytes"),
    "bad-magic": (lambda v1, v0: b"ak43" + v1[4:], r"no ak42 magic"),
    "unknown-version": (lambda v1, v0: _with_int(v1, 4, 3), r"unknown llama2.c version 3"),
    "kv-heads": (lambda v1, v0: _with_int(v1, 8 + 4 * 4, 3), r"n_heads=4 is not a multiple of n_kv_heads=3"),
    "kv-heads-v0": (lambda v1, v0: _with_int(v0, 4 * 4, 3), r"n_heads=4 is not a multiple of n_kv_heads=3"),
    "dim-heads": (lambda v1, v0: _with_int(v1, 8 + 3 * 4, 5), r"dim=64 is not a multiple of n_heads=5"),
    "zero-layers": (lambda v1, v0: _with_int(v1, 8 + 2 * 4, 0), r"must be positive, got n_layers=0"),
    "negative-vocab-v1": (lambda v1, v0: _with_int(v1, 8 + 5 * 4, -96), r"vocab_size=-96"),
    "bad-flag": (lambda v1, v0: v1[:36] + b"\x07" + v1[37:], r"shared-classifier flag is 7"),
    "short-v1-header": (lambda v1, v0: v1[:100], r"too small for a llama2.c v1/v2 header"),
    "short": (lambda v1, v0: v0[:20], r"20 bytes is too small for a llama2.c header"),
    "empty": (lambda v1, v0: b"", r"0 bytes is too small"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_files(tmp_path, case):
    corrupt, pattern = CORRUPTIONS[case]
    good1, good0 = _v1_bytes(tmp_path), _v0_bytes(tmp_path)
    path = tmp_path / "bad.bin"
    path.write_bytes(corrupt(good1, good0))
    before = sha(path)
    with pytest.raises(ValueError, match=pattern) as info:
        read_llama2c(path)
    assert str(path) in str(info.value)
    if case.startswith("truncated") or case.startswith("trailing"):
        expected = len(good1 if case in ("truncated", "trailing") else good0)
        assert f"{path.stat().st_size} bytes" in str(info.value) and f"implies {expected} bytes" in str(info.value)
    assert sha(path) == before


def test_q80_group_size_must_divide(tmp_path):
    model = original(True)
    path = write_llama2c(tmp_path / "q.bin", model.state_dict(), model.config, 2)
    data = path.read_bytes()
    for group, pattern in ((0, "group size must be positive"), (7, "not a multiple of the group size 7")):
        path.write_bytes(_with_int(data, 37, group))
        with pytest.raises(ValueError, match=pattern):
            read_llama2c(path)


def test_q80_early_layout_rejected(tmp_path):
    """The first v2 export.py wrote every tensor's int8 values, then every scale: same size, other layout."""
    model = original(True)
    path = write_llama2c(tmp_path / "q.bin", model.state_dict(), model.config, 2)
    t = llama2c_tensors(model.state_dict(), model.config)
    quantised = [quantize_q80(w, GROUP) for w in [*t["emb"], *t["wq"], *t["wk"], *t["wv"], *t["wo"], *t["w1"],
                                                  *t["w2"], *t["w3"]]]
    data = path.read_bytes()
    start = 256 + 4 * (2 * 2 * 64 + 64)
    early = data[:start] + b"".join(q.numpy().tobytes() for q, _ in quantised) + b"".join(
        s.numpy().tobytes() for _, s in quantised)
    assert len(early) == len(data)
    path.write_bytes(early)
    with pytest.raises(ValueError, match=r"early export\.py"):
        read_llama2c(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_llama2c(tmp_path / "absent.bin")


# ---------------------------------------------------------------------------------------------- reference
def read_raw_v0(path: Path) -> tuple[list[int], bool, dict[str, torch.Tensor]]:
    """The llama2.c tensors of a v0 file exactly as stored (Meta layout, freq_cis included), parsed here
    independently of the reader under test."""
    data = np.fromfile(path, dtype="<f4", offset=28)
    p = list(np.fromfile(path, dtype="<i4", count=7))
    shared, p[5] = p[5] > 0, abs(p[5])
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = p
    hs = dim // n_heads
    shapes = [("tok", (vocab, dim)), ("att_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, n_kv * hs, dim)), ("wv", (n_layers, n_kv * hs, dim)), ("wo", (n_layers, dim, dim)),
              ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("norm", (dim,)), ("fcr", (seq, hs // 2)), ("fci", (seq, hs // 2))]
    if not shared:
        shapes.append(("cls", (vocab, dim)))
    raw, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        raw[name] = torch.from_numpy(data[pos:pos + n].copy()).reshape(shape)
        pos += n
    assert pos == data.size
    raw.setdefault("cls", raw["tok"])
    return p, shared, raw


def reference_logits(p: list[int], raw: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """llama2.c's forward in float64: RoPE rotates adjacent pairs as complex numbers by the file's freq_cis."""
    raw = {k: v.double() for k, v in raw.items()}
    dim, _, n_layers, n_heads, n_kv, _, _ = p
    hs, t = dim // n_heads, len(tokens)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    rot = torch.complex(raw["fcr"][:t], raw["fci"][:t])[:, None, :]  # [t, 1, hs/2]

    def rope(x):  # x [t, heads, hs]: pairs (x0, x1), (x2, x3), ... are complex numbers
        return torch.view_as_real(torch.view_as_complex(x.reshape(t, -1, hs // 2, 2).contiguous()) * rot).flatten(2)

    x = raw["tok"][tokens]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in range(n_layers):
        h = rms(x, raw["att_norm"][layer])
        q = rope((h @ raw["wq"][layer].T).view(t, n_heads, hs))
        k = rope((h @ raw["wk"][layer].T).view(t, n_kv, hs)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ raw["wv"][layer].T).view(t, n_kv, hs).repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, dim) @ raw["wo"][layer].T
        h = rms(x, raw["ffn_norm"][layer])
        x = x + (F.silu(h @ raw["w1"][layer].T) * (h @ raw["w3"][layer].T)) @ raw["w2"][layer].T
    return rms(x, raw["norm"]) @ raw["cls"].T


def test_reference_forward_synthetic_untied(tmp_path):
    model = original(False)
    path = write_llama2c(tmp_path / "m.bin", model.state_dict(), model.config, 0)
    p, shared, raw = read_raw_v0(path)
    assert not shared
    tokens = IDS[0].tolist()
    with torch.no_grad():
        ours = build(read_llama2c(path))(IDS).logits[0]
    torch.testing.assert_close(ours.double(), reference_logits(p, raw, tokens), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- stories260K
@pytest.fixture(scope="module")
def stories():
    root = assets_dir() / "stories260K"
    if not (root / "stories260K.bin").is_file():
        pytest.skip(f"real llama2.c asset not found: {root / 'stories260K.bin'} (set LLAMA_CORE_ASSETS)")
    return root


def greedy(model: LlamaForCausalLM, steps: int) -> list[int]:
    ids, cache, nxt = [1], DynamicCache(), torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
            token = int(logits.argmax())
            if token == model.config.eos_token_id:
                break
            ids.append(token)
            nxt = torch.tensor([[token]])
    return ids


def test_stories260k_config_and_story(stories):
    spm = pytest.importorskip("sentencepiece")
    path = stories / "stories260K.bin"
    before = sha(path)
    source = read_llama2c(path)
    c = source.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (
        64, 172, 5, 8, 4, 512, 512, True)
    assert "lm_head.weight" not in source.specs and len(source.specs) == 2 + 9 * 5

    ids = greedy(build(source), 160)
    text = spm.SentencePieceProcessor(model_file=str(stories / "tok512.model")).decode(ids)
    assert text.startswith(STORY), text
    assert sha(path) == before


def test_stories260k_matches_interleaved_reference(stories):
    path = stories / "stories260K.bin"
    p, shared, raw = read_raw_v0(path)
    assert shared
    model = build(read_llama2c(path))
    tokens = greedy(model, 48)
    ref = reference_logits(p, raw, tokens)
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0]
        # float64 on both sides leaves only the layout in question; fp32 within the numerics contract
        ours64 = build(read_llama2c(path, dtype=torch.float64), torch.float64)(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours64, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-4)
    # The same check fails without the permutation, so it does test it.
    unpermuted = dict(read_llama2c(path).stream())
    for i in range(p[2]):
        unpermuted[f"model.layers.{i}.self_attn.q_proj.weight"] = raw["wq"][i]
        unpermuted[f"model.layers.{i}.self_attn.k_proj.weight"] = raw["wk"][i]
    model.load_state_dict(unpermuted, strict=False)
    with torch.no_grad():
        wrong = model(torch.tensor([tokens])).logits[0].double()
    assert (wrong - ref).abs().max() > 1e-2
