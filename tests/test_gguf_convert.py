"""Writing GGUF (HF -> GGUF) and reading it back: bit-exact round trips, Q8_0 within its bound, the
metadata and tensor layout llama.cpp expects, rope scaling in both directions, and every bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from checkpoints_convert.gguf import read_gguf
from checkpoints_convert.gguf_write import write_gguf
from checkpoints_convert.hf import read_hf
from llama_core import LlamaForCausalLM
from tests.conftest import random_model, small_config

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0, 100, 3]])


def saved(tmp_path, name="hf", seed=0, **overrides):
    model = random_model(small_config(**overrides), seed=seed)
    return model, model.save_pretrained(tmp_path / name)


def to_gguf(hf_dir, path, outtype="f32", add_metadata=None):
    return write_gguf(read_hf(hf_dir, torch.float32), path, outtype, add_metadata=add_metadata, progress=False)


def state(source):
    return dict(source.stream())


@pytest.mark.parametrize("overrides", [
    {},  # GQA 4:2, untied
    {"tie_word_embeddings": True, "num_key_value_heads": 1},  # MQA, tied: no output.weight
    {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4},
    {"head_dim": 32},  # head_dim * heads != hidden: key_length in the metadata
])
def test_f32_round_trip_is_bit_exact(tmp_path, overrides):
    model, hf = saved(tmp_path, **overrides)
    path = to_gguf(hf, tmp_path / "m.gguf")
    back = read_gguf(path)
    expected = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    got = state(back)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert getattr(back.config, field) == getattr(model.config, field), field
    loaded = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_round_trips(tmp_path, scaling):
    """Llama 3 scaling travels as llama.cpp's rope_freqs tensor and comes back as the same four numbers."""
    model, hf = saved(tmp_path, rope_theta=500000.0, head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                      rope_scaling=scaling)
    path = to_gguf(hf, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    assert ("rope_freqs.weight" in [t.name for t in reader.tensors]) == (scaling["rope_type"] == "llama3")
    back = read_gguf(path)
    assert back.config.rope_scaling == {k: v for k, v in model.config.rope_scaling.items()}
    loaded = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_rope_freqs_of_no_llama3_shape_are_refused(tmp_path):
    from checkpoints_convert.gguf_rope import llama3_scaling_from_rope_freqs

    ramp = torch.linspace(1, 5, 32)  # a straight ramp from 1 to 5: not Llama 3's curve
    with pytest.raises(ValueError, match="do not follow Llama 3 scaling"):
        llama3_scaling_from_rope_freqs(ramp, 64, 10000.0, None, where="x.gguf")
    with pytest.raises(ValueError, match="are not Llama 3 scaling divisors"):
        llama3_scaling_from_rope_freqs(torch.full((32,), 2.0), 64, 10000.0, None, where="x.gguf")


def test_q8_0_stays_within_its_bound(tmp_path):
    """Each 32-value block is stored as round(x / d) * d with d = amax / 127 in fp16: error <= ~0.56 d."""
    model, hf = saved(tmp_path, hidden_size=64, intermediate_size=96)
    path = to_gguf(hf, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    got = state(read_gguf(path))
    for name, w in model.state_dict().items():
        if w.dim() < 2:
            assert torch.equal(got[name], w), name  # 1-D tensors stay F32
            continue
        blocks = w.reshape(-1, 32)
        bound = blocks.abs().amax(-1, keepdim=True) / 127 * 0.57
        assert ((got[name].reshape(-1, 32) - blocks).abs() <= bound + 1e-12).all(), name


def test_written_metadata_and_tensors_as_llama_cpp_names_them(tmp_path):
    model, hf = saved(tmp_path)
    path = to_gguf(hf, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(path)
    value = {k: f.contents() for k, f in reader.fields.items()}
    c = model.config
    assert value["general.architecture"] == "llama"
    assert (value["llama.block_count"], value["llama.embedding_length"], value["llama.feed_forward_length"],
            value["llama.attention.head_count"], value["llama.attention.head_count_kv"],
            value["llama.context_length"], value["llama.rope.dimension_count"]) == (
        c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
        c.max_position_embeddings, c.head_dim)
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
    assert list(tensors["blk.1.attn_k.weight"].shape) == [c.hidden_size, c.num_key_value_heads * c.head_dim]
    # llama.cpp's q rows are HF's permuted into the interleaved layout, head by head
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).float()
    hf_q = model.model.layers[0].self_attn.q_proj.weight.detach().half().float()
    d = c.head_dim
    assert torch.equal(q[1], hf_q[d // 2]) and torch.equal(q[2], hf_q[1])


def test_dynamic_rope_has_no_gguf_form(tmp_path):
    _, hf = saved(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="no GGUF form"):
        to_gguf(hf, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_a_failing_write_leaves_the_old_file(tmp_path):
    _, hf = saved(tmp_path)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    source = read_hf(hf, torch.float32)
    real = source.stream

    def dying():
        for i, item in enumerate(real()):
            if i == 3:
                raise OSError("disk full")
            yield item

    source.stream = dying
    with pytest.raises(OSError, match="disk full"):
        write_gguf(source, target, progress=False)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["hf", "m.gguf"]


# ---------------------------------------------------------------------------------------------- bad input
def crafted(tmp_path, edit=None, tensors=None, arch="llama"):
    """A tiny GGUF written with the gguf package directly: ``edit(writer)`` changes the metadata before it
    is written; ``tensors`` replaces the tensor list (name -> (numpy data, GGML type))."""
    from checkpoints_convert.gguf_write import _add_hyperparameters, gguf_name

    model = random_model(small_config())
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(path, arch)
    _add_hyperparameters(writer, gguf, model.config, "f32")
    if edit is not None:
        edit(writer)
    if tensors is None:
        tensors = {gguf_name(k): (v.numpy(), gguf.GGMLQuantizationType.F32) for k, v in model.state_dict().items()}
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_are_refused_by_name(tmp_path):
    good = crafted(tmp_path)
    assert read_gguf(good).config.num_hidden_layers == 2
    data = good.read_bytes()

    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"header\.gguf"):
        read_gguf(tmp_path / "header.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match=r"magic\.gguf is not a GGUF file"):
        read_gguf(tmp_path / "magic.gguf")
    (tmp_path / "version.gguf").write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    with pytest.raises(ValueError, match=r"version\.gguf: unsupported GGUF version"):
        read_gguf(tmp_path / "version.gguf")


def test_bad_metadata_is_refused_by_name(tmp_path):
    def drop(key):
        return lambda w: w.kv_data[0].pop(key)

    with pytest.raises(ValueError, match=r"metadata key 'llama\.block_count' is missing"):
        read_gguf(crafted(tmp_path, drop("llama.block_count")))
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        read_gguf(crafted(tmp_path, arch="qwen2"))

    def wrong_ffn(w):
        w.kv_data[0]["llama.feed_forward_length"].value = 100

    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight has shape \[112, 64\] but the metadata implies "
                                         r"\[100, 64\]"):
        read_gguf(crafted(tmp_path, wrong_ffn))


def test_unknown_and_missing_tensors_and_unsupported_types(tmp_path):
    model = random_model(small_config())
    from checkpoints_convert.gguf_write import gguf_name

    f32 = {gguf_name(k): (v.numpy(), gguf.GGMLQuantizationType.F32) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        read_gguf(crafted(tmp_path, tensors={k: v for k, v in f32.items() if k != "blk.1.ffn_up.weight"}))
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_rot\.weight is not part of a Llama"):
        read_gguf(crafted(tmp_path, tensors=f32 | {"blk.0.attn_rot.weight": (np.zeros(4, np.float32),
                                                                              gguf.GGMLQuantizationType.F32)}))
    # IQ4_NL: a real llama.cpp type that llama_core does not dequantise; the error names tensor and type
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    rows, cols = 112, 64
    raw = np.zeros((rows, cols // block * size), np.uint8)
    bad = crafted(tmp_path, tensors=f32 | {"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.IQ4_NL)})
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor blk\.0\.ffn_up\.weight has GGML type IQ4_NL, which "
                                         r"llama_core does not dequantise \(supported: F32, F16, BF16, Q8_0"):
        read_gguf(bad)  # refused before any tensor is read
