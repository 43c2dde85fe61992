"""Hugging Face compatibility fixes (issue 15, part B), each checked against transformers on the same files:
num_labels from id2label (how transformers stores it), max_position_embeddings through HF -> Meta -> HF, and
forward's ``cache=`` (transformers >= 5.24's name for ``past_key_values=``)."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints_convert import hf_to_meta, meta_to_hf
from llama_core import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from llama_core.modeling.cache import DynamicCache
from tests.conftest import random_model, small_config

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 4]])


def _reference_classifier(transformers_module, path, **fields):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)
    torch.manual_seed(0)
    config = transformers_module.LlamaConfig(**base, **fields)
    model = transformers_module.LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("fields", [
    {"num_labels": 3},
    {"id2label": {0: "negative", 1: "neutral", 2: "positive"}},
    {"num_labels": 1},  # a reward model
])
def test_transformers_classifier_keeps_its_label_count(transformers_module, tmp_path, fields):
    ref = _reference_classifier(transformers_module, tmp_path / "ref", **fields)
    written = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert "num_labels" not in written or written["num_labels"] is None  # transformers stores id2label only
    ours = LlamaForSequenceClassification.from_pretrained(tmp_path / "ref")
    n = ref.config.num_labels
    assert ours.config.num_labels == n and ours.score.weight.shape == (n, 64)
    assert ours.config.id2label == ref.config.id2label
    assert ours.config.label2id == {v: k for k, v in ref.config.id2label.items()}  # transformers may leave it None
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, atol=1e-4, rtol=0)
    # and back: what we save, transformers reads with the same labels
    ours.save_pretrained(tmp_path / "ours")
    again = transformers_module.AutoConfig.from_pretrained(tmp_path / "ours")
    assert again.num_labels == n and again.id2label == ref.config.id2label


def test_num_labels_and_id2label_stay_consistent():
    c = small_config(id2label={"0": "no", "1": "yes", "2": "maybe"})
    assert c.num_labels == 3 and c.label2id == {"no": 0, "yes": 1, "maybe": 2}
    more = c.replace(num_labels=5)  # as transformers: a new count brings default names
    assert more.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert c.replace(id2label={0: "a"}).num_labels == 1
    assert LlamaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"id2label keys must be 0\.\.n-1"):
        small_config(id2label={"0": "a", "5": "b"})


def test_hf_meta_hf_keeps_max_position_embeddings(tmp_path):
    model = random_model(small_config(max_position_embeddings=512))
    model.save_pretrained(tmp_path / "hf")
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", progress=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert "max_seq_len" not in params  # Meta's Llama.build takes max_seq_len itself; the key would clash
    meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    back = LlamaConfig.from_pretrained(tmp_path / "back")
    assert back.max_position_embeddings == 512


def test_hf_meta_hf_leaves_params_alone_when_the_context_is_inferable(tmp_path):
    """A context length the reader infers anyway (2048 for this vocabulary) adds no key to params.json."""
    random_model(small_config(max_position_embeddings=2048)).save_pretrained(tmp_path / "hf")
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", progress=False)
    assert "max_position_embeddings" not in json.loads((tmp_path / "meta" / "params.json").read_text())
    meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    assert LlamaConfig.from_pretrained(tmp_path / "back").max_position_embeddings == 2048


@pytest.mark.parametrize("cls", [LlamaForCausalLM, LlamaModel, LlamaForSequenceClassification])
def test_forward_accepts_cache_as_transformers_5_24_names_it(cls):
    model = random_model(small_config(pad_token_id=0), cls=cls)

    def two_steps(**name) -> torch.Tensor:
        cache = DynamicCache()
        model(IDS[:, :-1], use_cache=True, **{next(iter(name)): cache})
        out = model(IDS[:, -1:], use_cache=True, **{next(iter(name)): cache})
        assert cache.get_seq_length() == IDS.shape[1]
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    with torch.no_grad():
        assert torch.equal(two_steps(cache=True), two_steps(past_key_values=True))
    with pytest.raises(ValueError, match="pass the KV cache as cache= or as its older name past_key_values=, not both"):
        model(IDS, cache=DynamicCache(), past_key_values=DynamicCache())


def test_transformers_forward_takes_cache(transformers_module):
    """The reference point: transformers' own forward takes ``cache=`` in the installed version."""
    import inspect

    assert "cache" in inspect.signature(transformers_module.LlamaForCausalLM.forward).parameters
