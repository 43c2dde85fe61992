"""from_pretrained / save_pretrained on good and bad checkpoints.

Bad input must fail with a clear exception naming what is wrong, and a failing load must never modify
the checkpoint it was reading (every file is hashed before and after). Good input must round-trip
bit-exactly: sharded, .bin, tied, task heads and dtypes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llama_core.model_io.safetensors_writer
from llama_core import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaModel,
)
from llama_core.model_io.saving import state_dict_for_saving
from tests.conftest import random_model, small_config

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0], [3, 3, 8, 100, 2, 64, 12, 7]])


# ---------------------------------------------------------------------- helpers
def file_hashes(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` (so added/removed files show up too)."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def load_fails(directory: Path, exc: type[Exception], contains: str | None = None, cls=LlamaForCausalLM,
               **kwargs) -> str:
    """Assert loading ``directory`` raises ``exc`` (with ``contains`` in its message) and leaves every
    file untouched; return the message."""
    before = file_hashes(directory)
    with pytest.raises(exc, match=re.escape(contains) if contains else None) as info:
        cls.from_pretrained(directory, **kwargs)
    assert file_hashes(directory) == before, "a failing load modified the checkpoint"
    return str(info.value)


def saved(tmp_path: Path, model=None, name: str = "ckpt", **save_kwargs) -> Path:
    """Save ``model`` (default: a small random causal LM) into tmp_path/name."""
    model = model if model is not None else random_model()
    return model.save_pretrained(tmp_path / name, **save_kwargs)


def tensor_names(path: Path) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def rewrite_weights(directory: Path, edit) -> None:
    """Apply ``edit(state)`` to the tensors of a single-file checkpoint and write them back."""
    path = directory / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        names = f.keys()
        state = {k: f.get_tensor(k).clone() for k in names}
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    data = json.loads((directory / "config.json").read_text())
    data.update(changes)
    (directory / "config.json").write_text(json.dumps(data))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    return model(ids).logits


# ---------------------------------------------------------------------- keys and shapes
def test_missing_key_is_named(tmp_path):
    """A tensor absent from the file is reported by name."""
    ckpt = saved(tmp_path)
    rewrite_weights(ckpt, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    message = load_fails(ckpt, ValueError, "missing keys")
    assert "model.layers.1.mlp.down_proj.weight" in message


def test_unexpected_key_is_named(tmp_path):
    """A tensor the model has no place for is reported by name."""
    ckpt = saved(tmp_path)
    rewrite_weights(ckpt, lambda s: s.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    message = load_fails(ckpt, ValueError, "unexpected keys")
    assert "model.layers.0.mlp.extra_proj.weight" in message


def test_stale_rotary_inv_freq_is_ignored(tmp_path):
    """Older exports carry rotary_emb.inv_freq buffers; they are recomputed, not an error."""
    model = random_model()
    ckpt = saved(tmp_path, model)
    rewrite_weights(ckpt, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    loaded = LlamaForCausalLM.from_pretrained(ckpt)
    assert torch.equal(logits(loaded), logits(model))


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    """A wrongly shaped tensor is reported with its name, the checkpoint's shape and the model's."""
    ckpt = saved(tmp_path)  # k_proj: 2 kv heads x 16 dims = [32, 64]
    rewrite_weights(ckpt, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 48)}))
    message = load_fails(ckpt, ValueError, "shape mismatch")
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "[32, 48]" in message and "[32, 64]" in message


def test_non_float_tensor_is_named(tmp_path):
    """Integer weights (a quantised or broken export) are refused by name instead of cast silently."""
    ckpt = saved(tmp_path)
    rewrite_weights(ckpt, lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    message = load_fails(ckpt, ValueError, "model.norm.weight")
    assert "int64" in message


# ---------------------------------------------------------------------- damaged files and paths
def test_truncated_safetensors_names_the_file(tmp_path):
    """A file cut in half (interrupted download) fails as a ValueError naming that file."""
    ckpt = saved(tmp_path)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    load_fails(ckpt, ValueError, "model.safetensors")


def test_corrupt_safetensors_header(tmp_path):
    """Garbage bytes instead of a safetensors header fail as a ValueError naming the file."""
    ckpt = saved(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\xde\xad\xbe\xef not a safetensors file " * 16)
    load_fails(ckpt, ValueError, "model.safetensors")


def test_nonexistent_path(tmp_path):
    """A path that does not exist (and is no hub id) is a FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        LlamaForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_file_instead_of_directory(tmp_path):
    """Passing a file (e.g. the weights file) instead of its directory is a ValueError."""
    ckpt = saved(tmp_path)
    before = file_hashes(ckpt)
    with pytest.raises(ValueError, match="directory"):
        LlamaForCausalLM.from_pretrained(ckpt / "model.safetensors")
    assert file_hashes(ckpt) == before


def test_directory_without_weights(tmp_path):
    """A directory with config.json but no weight files is a FileNotFoundError listing what was expected."""
    ckpt = saved(tmp_path)
    (ckpt / "model.safetensors").unlink()
    load_fails(ckpt, FileNotFoundError, "model.safetensors")


def test_index_listing_missing_shard(tmp_path):
    """A sharded checkpoint whose index names a shard that is not there fails naming that shard."""
    ckpt = saved(tmp_path, max_shard_size="30KB")
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    last = sorted(set(weight_map.values()))[-1]
    (ckpt / last).unlink()
    load_fails(ckpt, FileNotFoundError, last)


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", ["int8", torch.int32, "nonsense"], ids=str)
def test_unsupported_dtype_argument(tmp_path, dtype):
    """Only floating-point target dtypes are accepted."""
    load_fails(saved(tmp_path), ValueError, "dtype", dtype=dtype)


def test_dtype_auto_follows_config(tmp_path):
    """dtype="auto" loads in the dtype recorded in config.json (here bf16), bit-exactly."""
    model = random_model().to(torch.bfloat16)
    ckpt = saved(tmp_path, model)
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = LlamaForCausalLM.from_pretrained(ckpt, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert_same_state(loaded, model)
    default = LlamaForCausalLM.from_pretrained(ckpt)  # no dtype: torch's default, fp32
    assert default.dtype == torch.float32


def test_dtype_casts_and_torch_dtype_alias(tmp_path):
    """dtype=torch.float16 casts every weight; torch_dtype is an alias; passing both is an error."""
    model = random_model()
    ckpt = saved(tmp_path, model)
    half = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.half())
    alias = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype="bfloat16")
    assert {p.dtype for p in alias.parameters()} == {torch.bfloat16}
    load_fails(ckpt, ValueError, "torch_dtype", dtype=torch.float16, torch_dtype=torch.float16)


# ---------------------------------------------------------------------- config.json
LLAMA3_NO_FACTOR = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16)
BAD_CONFIGS = {
    "unknown-rope-type": ("rope_type", dict(rope_scaling=dict(rope_type="warp-drive", factor=2.0),
                                            rope_parameters=dict(rope_type="warp-drive", factor=2.0,
                                                                 rope_theta=10000.0))),
    "heads-do-not-divide-hidden": ("hidden_size", dict(num_attention_heads=5, num_key_value_heads=5,
                                                      head_dim=None)),
    "kv-heads-do-not-divide-heads": ("num_key_value_heads", dict(num_key_value_heads=3)),
    "llama3-without-factor": ("factor", dict(rope_scaling=LLAMA3_NO_FACTOR,
                                             rope_parameters={**LLAMA3_NO_FACTOR, "rope_theta": 10000.0})),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_invalid_config_names_the_field(tmp_path, case):
    """A config no Llama can have is a ValueError naming the offending field."""
    field, changes = BAD_CONFIGS[case]
    ckpt = saved(tmp_path)
    edit_config(ckpt, **changes)
    load_fails(ckpt, ValueError, field)


def test_config_that_is_not_json(tmp_path):
    """A config.json that does not parse is a ValueError naming the file."""
    ckpt = saved(tmp_path)
    (ckpt / "config.json").write_text("{'hidden_size': 64,")
    load_fails(ckpt, ValueError, "config.json")


# ---------------------------------------------------------------------- .bin checkpoints
def test_pytorch_bin_checkpoint_loads(tmp_path):
    """A pytorch_model.bin (torch.save of the state dict) loads with identical logits."""
    model = random_model()
    ckpt = saved(tmp_path, model)
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    loaded = LlamaForCausalLM.from_pretrained(ckpt)
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


class _CreatesMarker:
    """Unpickling this runs open(marker, "w"): the file appearing means arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_with_code_is_refused(tmp_path):
    """.bin files go through the weights-only unpickler: a pickle that would run code is refused
    (ValueError) and its payload never runs."""
    model = random_model()
    # The payload is live: an unrestricted unpickler does create the marker.
    probe_marker = tmp_path / "probe-marker"
    torch.save({"x": _CreatesMarker(probe_marker)}, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)["x"].close()
    assert probe_marker.exists()

    ckpt = saved(tmp_path, model)
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    state = dict(model.state_dict())
    state["model.norm.weight"] = _CreatesMarker(marker)
    torch.save(state, ckpt / "pytorch_model.bin")
    message = load_fails(ckpt, ValueError, "weights-only")
    assert "pytorch_model.bin" in message
    assert not marker.exists(), "the unpickler ran code from the checkpoint"


def test_plain_pickle_bin_is_refused(tmp_path):
    """A .bin that is a bare pickle of a Python object (not torch tensors) is refused too."""
    ckpt = saved(tmp_path)
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=2))
    load_fails(ckpt, ValueError, "pytorch_model.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------- saving
def test_save_over_existing_keeps_foreign_files(tmp_path):
    """Saving over a checkpoint replaces config and weights but keeps files that are not ours."""
    ckpt = saved(tmp_path, random_model(seed=0))
    (ckpt / "tokenizer.json").write_text('{"version": "1.0"}')
    (ckpt / "extras").mkdir()
    (ckpt / "extras" / "notes.txt").write_text("hello")
    newer = random_model(seed=1)
    newer.save_pretrained(ckpt)
    assert (ckpt / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (ckpt / "extras" / "notes.txt").read_text() == "hello"
    assert_same_state(LlamaForCausalLM.from_pretrained(ckpt), newer)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_over_sharded_checkpoint_drops_stale_shards(tmp_path):
    """Re-saving a sharded checkpoint as one file leaves no stale shards or index behind."""
    ckpt = saved(tmp_path, max_shard_size="30KB")
    model = random_model(seed=3)
    model.save_pretrained(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(LlamaForCausalLM.from_pretrained(ckpt), model)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    """A save that dies after writing its first shard leaves the old checkpoint byte-for-byte as it was
    and no temporary directory behind."""
    parent = tmp_path / "checkpoints"
    ckpt = saved(parent, random_model(seed=0))
    (ckpt / "tokenizer.json").write_text("{}")
    before = file_hashes(ckpt)

    real_write = llama_core.model_io.safetensors_writer.write_safetensors
    written = []

    def write_then_fail(filename, *args, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(filename)
        return real_write(filename, *args, **kwargs)

    monkeypatch.setattr(llama_core.model_io.safetensors_writer, "write_safetensors", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        random_model(seed=1).save_pretrained(ckpt, max_shard_size="30KB")
    assert len(written) == 1 and Path(written[0]).name.startswith("model-00001-of-")  # it failed midway
    assert file_hashes(ckpt) == before
    assert sorted(p.name for p in parent.iterdir()) == ["ckpt"], "temporary directories were left behind"


def test_sharded_save_and_bit_exact_load(tmp_path):
    """max_shard_size="30KB" writes several shards within the limit plus an index covering every tensor;
    loading them back is bit-exact."""
    model = random_model()
    ckpt = saved(tmp_path, model, max_shard_size="30KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2
    assert not (ckpt / "model.safetensors").exists()
    state = state_dict_for_saving(model)
    assert set(weight_map) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        with safe_open(ckpt / shard, framework="pt") as f:
            keys = list(f.keys())
            assert {k for k, v in weight_map.items() if v == shard} == set(keys)
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert len(keys) == 1 or size <= 30_000, f"{shard} holds {size} bytes"
    assert_same_state(LlamaForCausalLM.from_pretrained(ckpt), model)


@pytest.mark.parametrize("size", ["lots", "5XB", "-1MB", 0, "0KB"])
def test_bad_max_shard_size(tmp_path, size):
    """An unreadable or non-positive shard size is a ValueError, raised before anything is written."""
    with pytest.raises(ValueError):
        random_model().save_pretrained(tmp_path / "ckpt", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- tied embeddings
def test_tied_model_saves_without_lm_head_and_loads_tied(tmp_path):
    """A tied model's checkpoint omits lm_head.weight; loading it ties lm_head to the embedding again."""
    model = random_model(small_config(tie_word_embeddings=True))
    ckpt = saved(tmp_path, model)
    assert "lm_head.weight" not in tensor_names(ckpt / "model.safetensors")
    loaded = LlamaForCausalLM.from_pretrained(ckpt)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_checkpoint_without_lm_head_loads_tied(tmp_path):
    """An untied config whose checkpoint lacks lm_head.weight loads with lm_head tied to the embedding."""
    model = random_model()
    ckpt = saved(tmp_path, model)
    rewrite_weights(ckpt, lambda s: s.pop("lm_head.weight"))
    loaded = LlamaForCausalLM.from_pretrained(ckpt)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


# ---------------------------------------------------------------------- task heads
def test_sequence_classifier_from_causal_lm_checkpoint(tmp_path, caplog):
    """A causal-LM checkpoint loads into LlamaForSequenceClassification: the decoder is the checkpoint's,
    the new score head is initialised (with a warning) and lm_head is dropped."""
    model = random_model()
    ckpt = saved(tmp_path, model)
    with caplog.at_level(logging.WARNING, logger="llama_core"):
        clf = LlamaForSequenceClassification.from_pretrained(ckpt, num_labels=3)
    assert "score.weight" in caplog.text
    assert clf.config.num_labels == 3 and clf.score.weight.shape == (3, 64)
    assert torch.isfinite(clf.score.weight).all() and clf.score.weight.std() > 0
    assert_same_state(clf.model, model.model)
    assert not hasattr(clf, "lm_head")
    assert clf(IDS[:1]).logits.shape == (1, 3)


def test_bare_decoder_from_causal_lm_checkpoint(tmp_path):
    """LlamaModel.from_pretrained(causal-LM checkpoint) loads the decoder weights and drops lm_head."""
    model = random_model()
    decoder = LlamaModel.from_pretrained(saved(tmp_path, model))
    assert_same_state(decoder, model.model)
    with torch.no_grad():
        assert torch.equal(decoder(IDS).last_hidden_state, model.model(IDS).last_hidden_state)


def test_question_answering_round_trip(tmp_path):
    """LlamaForQuestionAnswering saves under the "transformer." prefix and loads back bit-exactly."""
    qa = random_model(cls=LlamaForQuestionAnswering)
    ckpt = saved(tmp_path, qa)
    keys = tensor_names(ckpt / "model.safetensors")
    assert "transformer.embed_tokens.weight" in keys and "qa_outputs.bias" in keys
    loaded = LlamaForQuestionAnswering.from_pretrained(ckpt)
    assert_same_state(loaded, qa)
    with torch.no_grad():
        a, b = qa(IDS), loaded(IDS)
    assert torch.equal(a.start_logits, b.start_logits) and torch.equal(a.end_logits, b.end_logits)


def test_question_answering_checkpoint_loads_in_transformers(tmp_path, transformers_module):
    """Our saved QA checkpoint loads in transformers' LlamaForQuestionAnswering with the same logits."""
    qa = random_model(cls=LlamaForQuestionAnswering)
    ckpt = saved(tmp_path, qa)
    ref = transformers_module.LlamaForQuestionAnswering.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        ours, theirs = qa(IDS), ref(IDS)
    torch.testing.assert_close(ours.start_logits, theirs.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.end_logits, theirs.end_logits, atol=1e-4, rtol=0)

