"""Meta <-> HF conversion: bit-exact round trips, model-parallel merge/split axes, params.json mapping,
logits equal to a reference that runs Meta's interleaved RoPE on the Meta tensors, and failure modes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoints_convert import hf_to_meta, meta_to_hf, read_meta, reshard
from checkpoints_convert.cli import main as convert_main
from checkpoints_convert.meta import ffn_hidden_dim, params_to_config
from llama_core import LlamaConfig, LlamaForCausalLM
from llama_core.cli import main as llama_core_main

LLAMA2_LIKE = dict(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64)
LLAMA3_LIKE = dict(LLAMA2_LIKE, rope_theta=500000.0, num_key_value_heads=2)


def hf_checkpoint(path: Path, dtype=torch.float32, seed=0, **fields) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA2_LIKE, **fields})).to(dtype).eval()
    with torch.no_grad():  # distinct norm weights, so a wrong mapping of norms shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def load_meta_dir(path: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]


def tree_hash(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("fields", "shards", "emb_dim"), [
    (LLAMA2_LIKE, 1, None), (LLAMA2_LIKE, 2, 1), (LLAMA3_LIKE, 2, 0), (dict(LLAMA2_LIKE, tie_word_embeddings=True), 2, 1),
])
def test_hf_meta_hf_is_bit_exact(tmp_path, fields, shards, emb_dim):
    model = hf_checkpoint(tmp_path / "hf", dtype=torch.bfloat16, **fields)
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=shards, progress=False)
    ranks = load_meta_dir(tmp_path / "meta")
    assert len(ranks) == shards
    if emb_dim is not None:  # the embedding is split on the axis of its generation
        assert ranks[0]["tok_embeddings.weight"].shape[emb_dim] * shards == model.model.embed_tokens.weight.shape[emb_dim]
        assert ranks[0]["layers.0.attention.wo.weight"].shape == (64, 64 // shards)   # row-parallel: dim 1
        assert ranks[0]["layers.0.attention.wq.weight"].shape == (64 // shards, 64)   # column-parallel: dim 0
        assert torch.equal(ranks[0]["norm.weight"], ranks[1]["norm.weight"])           # replicated
    assert ("output.weight" in ranks[0]) != model.config.tie_word_embeddings
    meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype="auto")
    assert back.dtype == torch.bfloat16 and back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert_state_equal(back.state_dict(), model.state_dict())
    for key in ("num_key_value_heads", "rope_theta", "intermediate_size", "rms_norm_eps", "vocab_size"):
        assert getattr(back.config, key) == getattr(model.config, key)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_hf_meta_is_bit_exact_including_params(tmp_path, shards):
    hf_checkpoint(tmp_path / "hf", **LLAMA3_LIKE)
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=shards, progress=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params["multiple_of"], params["ffn_dim_multiplier"] = 32, None  # 2/3*256=170 -> 192, as LLAMA2_LIKE
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    meta_to_hf(tmp_path / "meta", tmp_path / "hf2", progress=False)
    hf_to_meta(tmp_path / "hf2", tmp_path / "meta2", num_shards=shards, progress=False)
    assert json.loads((tmp_path / "meta2" / "params.json").read_text()) == params
    for a, b in zip(load_meta_dir(tmp_path / "meta"), load_meta_dir(tmp_path / "meta2"), strict=True):
        assert_state_equal(a, b)


def meta_reference_logits(ranks: list[dict[str, torch.Tensor]], params: dict, ids: torch.Tensor) -> torch.Tensor:
    """Meta's llama model.py, written out: interleaved (complex) RoPE applied to the Meta tensors."""
    emb_dim = 1 if ranks[0]["tok_embeddings.weight"].shape[1] != params["dim"] else 0
    axes = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}

    def w(key):
        parts = [r[key].float() for r in ranks]
        kind = key.split(".")[-2] if key.count(".") > 1 else key.split(".")[0]
        axis = emb_dim if key.startswith("tok_") else axes.get(kind)
        return parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, axis)

    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd, eps, (b, t) = dim // n_heads, params["norm_eps"], ids.shape
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # [b, t, heads, hd] rotating adjacent pairs
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    h = w("tok_embeddings.weight")[ids]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w(p + "attention_norm.weight"))
        q = rope((x @ w(p + "attention.wq.weight").T).view(b, t, n_heads, hd))
        k = rope((x @ w(p + "attention.wk.weight").T).view(b, t, n_kv, hd))
        v = (x @ w(p + "attention.wv.weight").T).view(b, t, n_kv, hd)
        k, v = (z.repeat_interleave(n_heads // n_kv, dim=2) for z in (k, v))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(b, t, dim) @ w(p + "attention.wo.weight").T
        x = rms(h, w(p + "ffn_norm.weight"))
        h = h + (F.silu(x @ w(p + "feed_forward.w1.weight").T) * (x @ w(p + "feed_forward.w3.weight").T)) @ \
            w(p + "feed_forward.w2.weight").T
    out = w("output.weight") if "output.weight" in ranks[0] else w("tok_embeddings.weight")
    return rms(h, w("norm.weight")) @ out.T


@pytest.mark.parametrize("fields", [LLAMA2_LIKE, LLAMA3_LIKE, dict(LLAMA2_LIKE, tie_word_embeddings=True)])
@torch.no_grad()
def test_converted_logits_equal_meta_reference(tmp_path, fields):
    """The permutation, merge axes and names are right: our model from the converted checkpoint (and
    straight from the Meta directory) computes what Meta's own formulation computes on Meta's tensors."""
    hf_checkpoint(tmp_path / "hf", **fields)
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=2, progress=False)
    meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    ids = torch.randint(0, 96, (2, 24))
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    want = meta_reference_logits(load_meta_dir(tmp_path / "meta"), params, ids)
    converted = LlamaForCausalLM.from_pretrained(tmp_path / "back")(ids).logits
    direct = LlamaForCausalLM.from_pretrained(tmp_path / "meta")(ids).logits  # one loader, in memory
    torch.testing.assert_close(converted, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct, converted, atol=0, rtol=0)


@torch.no_grad()
def test_transformers_loads_the_converted_checkpoint(tmp_path, transformers_module):
    model = hf_checkpoint(tmp_path / "hf", **LLAMA3_LIKE)
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=2, progress=False)
    meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    ref = transformers_module.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 96, (1, 16))
    torch.testing.assert_close(ref(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_params_mapping():
    base = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336 and ffn_hidden_dim(4096, 256, None) == 11008
    c = params_to_config(base, 128256, 14336, False, torch.bfloat16)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    assert (c.max_position_embeddings, c.bos_token_id, c.head_dim) == (131072, 128000, 128)
    c32 = params_to_config(dict(base, rope_scaling_factor=32.0), 128256, 14336, False, torch.bfloat16)
    assert c32.rope_scaling["factor"] == 32.0  # from the file, not a constant
    llama2 = params_to_config(dict(base, vocab_size=-1, use_scaled_rope=False, multiple_of=256,
                                   ffn_dim_multiplier=None, rope_theta=10000.0), 32000, 11008, False, torch.float16)
    assert (llama2.vocab_size, llama2.max_position_embeddings, llama2.rope_scaling) == (32000, 4096, None)
    with pytest.raises(ValueError, match="FFN size of 14336"):
        params_to_config(base, 128256, 11008, False, torch.bfloat16)


# ------------------------------------------------------------------------------------------- failures
@pytest.fixture
def meta_dir(tmp_path):
    hf_checkpoint(tmp_path / "hf", **LLAMA3_LIKE)
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", num_shards=2, progress=False)
    return tmp_path / "meta"


def test_missing_params_keys(meta_dir, tmp_path):
    params = json.loads((meta_dir / "params.json").read_text())
    del params["n_heads"], params["norm_eps"]
    (meta_dir / "params.json").write_text(json.dumps(params))
    before = tree_hash(meta_dir)
    with pytest.raises(ValueError, match="missing n_heads, norm_eps"):
        meta_to_hf(meta_dir, tmp_path / "out", progress=False)
    assert tree_hash(meta_dir) == before and not (tmp_path / "out").exists()


def test_shard_shapes_that_do_not_join(meta_dir, tmp_path):
    rank1 = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    rank1["layers.1.attention.wo.weight"] = rank1["layers.1.attention.wo.weight"][:-1]
    torch.save(rank1, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wo\.weight: shard shapes"):
        meta_to_hf(meta_dir, tmp_path / "out", progress=False)


def test_mixed_dtypes(meta_dir, tmp_path):
    rank1 = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    rank1["norm.weight"] = rank1["norm.weight"].half()
    torch.save(rank1, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match="mixed dtypes"):
        read_meta(meta_dir)


def test_missing_rank_and_different_tensor_sets(meta_dir, tmp_path):
    rank1 = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    del rank1["layers.0.ffn_norm.weight"]
    torch.save(rank1, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"layers\.0\.ffn_norm\.weight"):
        read_meta(meta_dir)
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"numbered 00\.\.01"):
        read_meta(meta_dir)


def test_output_rules(meta_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        meta_to_hf(meta_dir, out, progress=False)
    meta_to_hf(meta_dir, out, force=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    with pytest.raises(ValueError, match="overlaps the input"):
        meta_to_hf(meta_dir, meta_dir / "hf", progress=False)
    with pytest.raises(ValueError, match="not divisible by 3 shards"):
        hf_to_meta(out, tmp_path / "m3", num_shards=3, progress=False)


def test_reshard_cast_and_tie(tmp_path):
    model = hf_checkpoint(tmp_path / "hf", tie_word_embeddings=True)
    reshard(tmp_path / "hf", tmp_path / "untied", max_shard_size="20KB", dtype="bfloat16", tie_embeddings=False,
            progress=False)
    index = json.loads((tmp_path / "untied" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"] and len(set(index["weight_map"].values())) > 3
    untied = LlamaForCausalLM.from_pretrained(tmp_path / "untied", dtype="auto")
    assert untied.dtype == torch.bfloat16 and not untied.config.tie_word_embeddings
    assert torch.equal(untied.lm_head.weight, model.lm_head.weight.bfloat16())
    reshard(tmp_path / "untied", tmp_path / "tied", tie_embeddings=True, progress=False)
    tied = LlamaForCausalLM.from_pretrained(tmp_path / "tied", dtype="auto")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert_state_equal(tied.state_dict(), untied.state_dict())
    with torch.no_grad():  # an lm_head that differs from the embedding cannot be dropped
        untied.lm_head.weight.add_(1)
    untied.save_pretrained(tmp_path / "different")
    with pytest.raises(ValueError, match="cannot tie"):
        reshard(tmp_path / "different", tmp_path / "bad", tie_embeddings=True, progress=False)
    assert not (tmp_path / "bad").exists()


def test_command_lines(tmp_path, capsys):
    hf_checkpoint(tmp_path / "hf", **LLAMA3_LIKE)
    assert convert_main(["hf-to-meta", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "meta"),
                         "--num-shards", "2", "--no-progress"]) == 0
    assert llama_core_main(["convert", "meta-to-hf", "--input", str(tmp_path / "meta"), "--output",
                            str(tmp_path / "back"), "--dtype", "float16", "--no-progress"]) == 0
    assert LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype="auto").dtype == torch.float16
    assert convert_main(["meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "back"),
                         "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err


def test_params_and_tensors_disagree_on_depth(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    params["n_layers"] = 3
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"n_layers=3 in params.json\) is missing 9 tensors: layers\.2\."):
        read_meta(meta_dir)


def test_output_may_sit_beside_the_input_but_never_contain_it(meta_dir, tmp_path):
    meta_to_hf(meta_dir, meta_dir.parent / "sibling", progress=False)  # same parent: fine
    assert (meta_dir.parent / "sibling" / "config.json").is_file()
    with pytest.raises(ValueError, match="overlaps the input"):
        meta_to_hf(meta_dir, meta_dir.parent, force=True, progress=False)  # would replace the input's parent
    assert (meta_dir / "params.json").is_file()
