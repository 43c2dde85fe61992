"""device_map / max_memory on a CPU-only machine, and the size strings they (and max_shard_size) accept."""

from __future__ import annotations

import pytest
import torch

from llama_core import LlamaForCausalLM, LlamaForQuestionAnswering
from llama_core.model_io.placement import infer_device_map, parse_size, placement_units
from tests.conftest import random_model, small_config

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0]])
CPU = torch.device("cpu")


@pytest.fixture
def cpu_only(monkeypatch):
    """Pretend no GPU exists, so the tests mean the same on a machine that has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def checkpoint(tmp_path):
    model = random_model()
    return model, model.save_pretrained(tmp_path / "ckpt")


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def test_auto_places_everything_on_cpu(checkpoint, cpu_only):
    """device_map="auto" without GPUs puts every tensor on the CPU and gives the saved model's logits."""
    model, ckpt = checkpoint
    loaded = LlamaForCausalLM.from_pretrained(ckpt, device_map="auto")
    assert {t.device for t in [*loaded.parameters(), *loaded.buffers()]} == {CPU}
    assert torch.equal(logits(loaded), logits(model))


def test_explicit_dict(checkpoint):
    """A dict naming each top-level module (a prefix covers its children) loads as the plain load."""
    model, ckpt = checkpoint
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    loaded = LlamaForCausalLM.from_pretrained(ckpt, device_map=device_map)
    assert {p.device for p in loaded.parameters()} == {CPU}
    assert torch.equal(logits(loaded), logits(model))


def test_dict_leaving_a_module_out_is_named(checkpoint):
    """A dict that places nothing for some parameters is a ValueError listing them."""
    _, ckpt = checkpoint
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="does not place") as info:
        LlamaForCausalLM.from_pretrained(ckpt, device_map=device_map)
    assert "model.layers.1." in str(info.value)
    assert "model.layers.0." not in str(info.value)


def test_disk_offload_is_refused(checkpoint):
    """Offloading to "disk" is not supported and says so."""
    _, ckpt = checkpoint
    with pytest.raises(ValueError, match="disk"):
        LlamaForCausalLM.from_pretrained(ckpt, device_map={"": "disk"})
    with pytest.raises(ValueError, match="disk"):
        LlamaForCausalLM.from_pretrained(ckpt, device_map={"model": "cpu", "lm_head": "disk"})


def test_bad_device_map_type(checkpoint):
    """A device_map that is neither None, "auto", a device nor a dict is a TypeError."""
    _, ckpt = checkpoint
    with pytest.raises(TypeError, match="device_map"):
        LlamaForCausalLM.from_pretrained(ckpt, device_map=["cpu"])


@pytest.mark.parametrize(("text", "expected"), [
    ("5GB", 5 * 10**9),
    ("500MB", 500 * 10**6),
    ("30KB", 30 * 10**3),
    ("2GiB", 2 * 2**30),
    ("1.5MiB", int(1.5 * 2**20)),
    ("  7 mb ", 7 * 10**6),
    ("123", 123),
    (4096, 4096),
])
def test_parse_size(text, expected):
    """Decimal units are powers of 1000, "i" units powers of 1024; ints pass through."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "5XB", "GB", "-1MB", "0KB", 0, -5, True, 1.5, None])
def test_parse_size_rejects(bad):
    """Unreadable, non-positive or non-int/str sizes are ValueErrors."""
    with pytest.raises(ValueError):
        parse_size(bad)


def test_infer_device_map_cpu_only(cpu_only):
    """With only a CPU budget, every placement unit (embeddings, each layer, norm, head) goes to the CPU."""
    with torch.device("meta"):
        model = LlamaForCausalLM(small_config(num_hidden_layers=3), init=False)
    mapping = infer_device_map(model, torch.float32, max_memory={"cpu": "1GB"})
    assert list(mapping) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
                             "model.norm", "lm_head"]
    assert set(mapping.values()) == {CPU}


def test_infer_device_map_heads_and_tied(cpu_only):
    """Task heads are placement units too; a tied lm_head is put with the embedding."""
    with torch.device("meta"):
        qa = LlamaForQuestionAnswering(small_config(), init=False)
        tied = LlamaForCausalLM(small_config(tie_word_embeddings=True), init=False)
    assert placement_units(qa)[-1] == "qa_outputs"
    assert set(infer_device_map(qa, torch.float32)) == set(placement_units(qa))
    mapping = infer_device_map(tied, torch.bfloat16, max_memory={"cpu": 10**9})
    assert mapping["lm_head"] == mapping["model.embed_tokens"] == CPU


def test_infer_device_map_too_small(cpu_only):
    """A max_memory the model cannot fit in is a ValueError naming the unit that did not fit."""
    with torch.device("meta"):
        model = LlamaForCausalLM(small_config(), init=False)
    with pytest.raises(ValueError, match=r"model\.embed_tokens"):
        infer_device_map(model, torch.float32, max_memory={"cpu": "10KB"})


def test_max_memory_through_from_pretrained(checkpoint, cpu_only):
    """from_pretrained passes max_memory on: a budget that fits loads, one that does not is refused."""
    model, ckpt = checkpoint
    loaded = LlamaForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": "10MB"})
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="max_memory"):
        LlamaForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": "1KB"})
