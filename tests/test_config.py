"""LlamaConfig: both config.json generations in, an HF-readable file out, and clear errors for bad configs."""

from __future__ import annotations

import json

import pytest

from llama_core import LlamaConfig, LlamaForCausalLM, preset_names

LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "transformers_version": "4.43.0",
}


def test_reads_v4_keys():
    c = LlamaConfig.from_dict(LLAMA31_V4)
    assert c.rope_type == "llama3" and c.rope_theta == 500000.0 and c.rope_scaling["factor"] == 8.0
    assert c.dtype == "bfloat16" and c.head_dim == 128 and c.num_key_value_groups == 4
    assert c.eos_token_ids == [128001, 128008, 128009]


def test_reads_legacy_type_key_and_v5_rope_parameters():
    legacy = LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1e4,
                                    "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "dtype": "float16",
                                "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    assert legacy.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert legacy.rope_theta == v5.rope_theta == 1e4 and v5.dtype == "float16"
    plain = LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


def test_round_trip_and_unknown_keys_preserved(tmp_path):
    data = dict(LLAMA31_V4, custom_field={"kept": True})
    c = LlamaConfig.from_dict(data)
    c.save_pretrained(tmp_path)
    again = LlamaConfig.from_pretrained(tmp_path)
    assert again == c
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["custom_field"] == {"kept": True}
    # both generations of keys, so transformers 4.x and 5.x read the file
    assert written["rope_parameters"]["rope_theta"] == 500000.0 and written["rope_theta"] == 500000.0
    assert written["rope_scaling"]["rope_type"] == "llama3" and written["torch_dtype"] == "bfloat16"


def test_transformers_reads_our_config(transformers_module, tmp_path):
    c = LlamaConfig.from_dict(LLAMA31_V4).replace(head_dim=64, attention_bias=True, pad_token_id=0)
    c.save_pretrained(tmp_path)
    ref = transformers_module.LlamaConfig.from_pretrained(tmp_path)
    assert ref.rope_parameters["rope_type"] == "llama3" and ref.rope_parameters["rope_theta"] == 500000.0
    assert ref.rope_parameters["original_max_position_embeddings"] == 8192
    assert (ref.head_dim, ref.attention_bias, ref.pad_token_id, ref.num_key_value_heads) == (64, True, 0, 8)


@pytest.mark.parametrize(("fields", "names"), [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "wobbly", "factor": 2.0}), "rope_type"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": -1.0}), "rope_scaling.factor"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(head_dim=15), "head_dim"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(pad_token_id=40000), "pad_token_id"),
    (dict(attn_implementation="flash"), "attn_implementation"),
])
def test_invalid_configs_name_the_field(fields, names):
    with pytest.raises(ValueError, match=names):
        LlamaConfig(**{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 32000, **fields})


def test_explicit_head_dim_may_differ_from_hidden_over_heads():
    c = LlamaConfig(hidden_size=96, num_attention_heads=4, head_dim=32, num_key_value_heads=2)
    assert c.head_dim == 32
    m = LlamaForCausalLM(c.replace(num_hidden_layers=1, vocab_size=50, intermediate_size=64))
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (128, 96)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LlamaConfig.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(("name", "params"), [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama3-8b", 8_030_261_248),
    ("llama3.1-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
    ("tinyllama-1.1b", 1_100_048_384), ("synthetic-100m", 100_092_672), ("llama2-70b", 68_976_648_192), ("llama3-70b", 70_553_706_496),
])
def test_presets_have_the_released_parameter_counts(name, params):
    import torch

    with torch.device("meta"):
        model = LlamaForCausalLM.from_preset(name)
    assert model.num_parameters() == params


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama3-8b") as e:
        LlamaConfig.from_preset("llama9-1t")
    assert "tiny" in str(e.value)
    assert "tiny" in preset_names()
    assert LlamaConfig.from_preset("tiny", num_hidden_layers=1).num_hidden_layers == 1


def test_config_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A failing rename keeps the old config.json and leaves no temporary behind."""
    import os

    LlamaConfig(vocab_size=128).save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()

    def broken(src, dst):
        raise OSError("simulated failure")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="simulated"):
        LlamaConfig(vocab_size=256).save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == before and sorted(os.listdir(tmp_path)) == ["config.json"]
