"""Loading-side safety (issue 15, part B): configs and headers are validated before anything is allocated.

* every float config field is finite and in range, every field of the right type (clear errors naming it);
* counts are bounded by the checkpoint itself before a layer is built (config.json vs tensor names, llama2.c
  and Meta headers vs the file sizes / tensors), and a model too big for memory is refused up front;
* NaN / inf weights are reported by name (a warning, or an error with check_finite=True), by the loader and
  by the converters' readers;
* index files are validated and their shard paths must stay inside the checkpoint (or its hub snapshot).

The huge-count cases run in a child process with a bounded address space and a timeout: without the checks
they run out of memory or for an hour; with them they fail in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert import hf_to_meta, meta_to_hf, read_meta
from checkpoints_convert.hf import read_hf
from checkpoints_convert.llama2c import MAGIC
from llama_core import LlamaConfig, LlamaForCausalLM
from llama_core.model_io.hf_checkpoint import NonFiniteWeightError, NonFiniteWeightWarning
from tests.conftest import REPO, random_model, small_config


def saved(tmp_path: Path, name: str = "ckpt", **fields) -> Path:
    directory = tmp_path / name
    random_model(small_config(**fields)).save_pretrained(directory)
    return directory


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # json writes float("nan") as NaN, which json (and config readers) accept


# ---------------------------------------------------------------------------------------------- config fields
@pytest.mark.parametrize(("field", "value", "exc"), [
    ("rms_norm_eps", math.nan, ValueError),
    ("rope_theta", math.nan, ValueError),
    ("rope_theta", math.inf, ValueError),
    ("initializer_range", math.nan, ValueError),
    ("attention_dropout", 1.5, ValueError),
    ("rope_theta", "abc", ValueError),        # a string where a number belongs (wrapped with the file name)
    ("num_hidden_layers", True, ValueError),  # a bool where an int belongs
    ("hidden_size", 64.0, ValueError),        # a float where an int belongs
    ("tie_word_embeddings", "yes", ValueError),
    ("eos_token_id", ["2"], ValueError),
])
def test_config_json_bad_field_is_named(tmp_path, field, value, exc):
    directory = saved(tmp_path)
    edit_json(directory / "config.json", lambda d: d.update({field: value}) or d.pop("rope_parameters"))
    with pytest.raises(exc, match=rf"config\.json.*{field}"):
        LlamaForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": math.nan},
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": math.inf},
    {"rope_type": "linear", "factor": "2"},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": math.nan, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32.5},
])
def test_rope_scaling_values_must_be_finite_numbers(scaling):
    with pytest.raises((TypeError, ValueError), match=r"rope_scaling\.\w+"):
        small_config(rope_scaling=scaling)


def test_direct_construction_raises_type_error_naming_the_field():
    with pytest.raises(TypeError, match="rope_theta must be a number, got str 'abc'"):
        small_config(rope_theta="abc")
    with pytest.raises(TypeError, match="num_attention_heads must be an integer, got bool"):
        small_config(num_attention_heads=True)
    with pytest.raises(ValueError, match=r"rms_norm_eps must be a finite number > 0\.0, got nan"):
        small_config(rms_norm_eps=math.nan)


def test_meta_params_with_nan_rope_theta_is_refused(tmp_path):
    saved(tmp_path, "hf")
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", progress=False)
    edit_json(tmp_path / "meta" / "params.json", lambda d: d.update(rope_theta=math.nan))
    with pytest.raises(ValueError, match="rope_theta must be a finite positive number, got nan"):
        meta_to_hf(tmp_path / "meta", tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
    edit_json(tmp_path / "meta" / "params.json", lambda d: d.update(rope_theta="abc"))
    with pytest.raises(TypeError, match="rope_theta must be a number, got str"):
        read_meta(tmp_path / "meta")


# ---------------------------------------------------------------------------------------------- huge counts
_CHILD = textwrap.dedent("""
    import json, resource, signal, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # 6 GiB of address space, torch included
    sys.path.insert(0, sys.argv[1])
    import torch
    from llama_core import LlamaConfig, LlamaForCausalLM
    from checkpoints_convert.llama2c import read_llama2c
    from checkpoints_convert.meta import read_meta

    def on_alarm(*_):
        raise TimeoutError("still running after 20 s")

    signal.signal(signal.SIGALRM, on_alarm)
    files = json.loads(sys.argv[2])
    cases = {
        "config_json_layers": lambda: LlamaForCausalLM.from_pretrained(files["config_json_layers"]),
        "llama2c_layers": lambda: read_llama2c(files["llama2c_layers"]),
        "meta_layers": lambda: read_meta(files["meta_layers"]),
        "gguf_layers": lambda: LlamaForCausalLM.from_pretrained(files["gguf_layers"]),
        "constructor": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=10**6, hidden_size=8192,
            intermediate_size=32768, num_hidden_layers=4096, num_attention_heads=64)),
    }
    results = {}
    for name, case in cases.items():
        start = time.perf_counter()
        signal.alarm(20)
        try:
            case()
            results[name] = ["no error", "", 0.0]
        except BaseException as e:
            results[name] = [type(e).__name__, str(e)[:600], 0.0]
        finally:
            signal.alarm(0)
        results[name][2] = time.perf_counter() - start
    print(json.dumps(results))
""")


def _llama2c_huge_header(path: Path) -> Path:
    """A v1 header claiming 2**31 - 1 layers over a few bytes of data."""
    header = struct.pack("<Ii7iB", MAGIC, 1, 64, 128, 2**31 - 1, 4, 4, 32, 16, 1)
    path.write_bytes(header.ljust(256, b"\0") + b"\0" * 4096)
    return path


def _gguf_huge_block_count(tmp: Path) -> Path:
    """A real (tiny) GGUF whose ``llama.block_count`` is patched in place to 2**31 - 1."""
    pytest.importorskip("gguf")
    from checkpoints_convert.gguf_write import write_gguf
    from llama_core.bench.llamacpp import minimal_vocab
    from llama_core.tokenizer.gguf_export import add_tokenizer_metadata

    random_model(small_config()).save_pretrained(tmp / "for_gguf")
    path = tmp / "huge.gguf"
    write_gguf(read_hf(tmp / "for_gguf"), path, "f32", progress=False,
               add_metadata=lambda w: add_tokenizer_metadata(w, minimal_vocab(128)))
    data = bytearray(path.read_bytes())
    at = data.index(b"llama.block_count") + len(b"llama.block_count")
    kind, count = struct.unpack_from("<II", data, at)  # value type (UINT32 = 4), then the value
    assert (kind, count) == (4, 2)
    struct.pack_into("<I", data, at + 4, 2**31 - 1)
    path.write_bytes(bytes(data))
    return path


def _meta_huge_n_layers(directory: Path) -> Path:
    directory.mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(32, 16), "norm.weight": torch.ones(16)},
               directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps({"dim": 16, "n_layers": 10**9, "n_heads": 2,
                                                       "norm_eps": 1e-5, "vocab_size": 32}))
    return directory


@pytest.fixture(scope="module")
def huge_count_results(tmp_path_factory):
    """Every huge-count case, run once in one bounded child process: name -> (exception, message, seconds)."""
    tmp = tmp_path_factory.mktemp("huge")
    config_dir = tmp / "config_json_layers"
    random_model(small_config()).save_pretrained(config_dir)
    edit_json(config_dir / "config.json", lambda d: d.update(num_hidden_layers=1_000_000))
    files = {"config_json_layers": str(config_dir),
             "llama2c_layers": str(_llama2c_huge_header(tmp / "huge.bin")),
             "meta_layers": str(_meta_huge_n_layers(tmp / "meta")),
             "gguf_layers": str(_gguf_huge_block_count(tmp))}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), json.dumps(files)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("case", "exc", "message"), [
    ("config_json_layers", "ValueError", r"config num_hidden_layers=1000000, but the checkpoint's tensors hold 2 "
                                         r"layers"),
    ("llama2c_layers", "ValueError", r"n_layers=2147483647.* implies \d+ bytes \(truncated\)"),
    ("meta_layers", "ValueError", r"n_layers=1000000000 in params.json\) is missing 9000000000 tensors"),
    ("gguf_layers", "ValueError", r"llama.block_count is 2147483647 but the file holds tensors of 2 layers"),
    ("constructor", "ModelTooLargeError", r"LlamaForCausalLM with this config has [\d,]+ parameters: [\d,]+ bytes in "
                                          r"torch.float32, more than the [\d,]+ bytes of physical memory on cpu"),
])
def test_huge_counts_fail_fast_with_a_clear_error(huge_count_results, case, exc, message):
    name, text, seconds = huge_count_results[case]
    assert name == exc, f"{case}: {name}: {text}"
    assert re.search(message, text), text
    assert seconds < 5, f"{case} took {seconds:.1f} s"


def test_config_sizes_are_checked_against_tensor_shapes_before_building(tmp_path):
    directory = saved(tmp_path)
    edit_json(directory / "config.json", lambda d: d.update(vocab_size=10**9))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: checkpoint \[128, 64\], but the config "
                                         r"\(vocab_size, hidden_size\) implies \[1000000000, 64\]"):
        LlamaForCausalLM.from_pretrained(directory)
    edit_json(directory / "config.json", lambda d: d.update(vocab_size=128, intermediate_size=10**7))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight: checkpoint \[112, 64\].*\(intermediate_size"):
        LlamaForCausalLM.from_pretrained(directory)


def test_meta_device_construction_is_not_limited():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=10**6, hidden_size=8192, intermediate_size=32768,
                                             num_hidden_layers=2, num_attention_heads=64))
    assert model.lm_head.weight.is_meta


# ---------------------------------------------------------------------------------------------- NaN / inf weights
def _poison(directory: Path, name: str = "model.layers.1.mlp.down_proj.weight", value=math.nan) -> str:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    tensors[name][0, 3] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return name


def test_loader_warns_or_refuses_non_finite_weights(tmp_path):
    directory = saved(tmp_path)
    name = _poison(directory)
    with pytest.warns(NonFiniteWeightWarning, match=rf"tensor {name} has 1 NaN or infinite values"):
        LlamaForCausalLM.from_pretrained(directory)
    with pytest.raises(NonFiniteWeightError, match=rf"tensor {name} has 1 NaN"):
        LlamaForCausalLM.from_pretrained(directory, check_finite=True)
    with warnings_as_errors():
        LlamaForCausalLM.from_pretrained(directory, check_finite=False)  # asked not to look: silent


def test_converters_warn_on_non_finite_weights(tmp_path):
    directory = saved(tmp_path, "hf")
    name = _poison(directory, "model.embed_tokens.weight", math.inf)
    with pytest.warns(NonFiniteWeightWarning, match=rf"tensor {name} has 1 NaN or infinite"):
        list(read_hf(directory).stream())
    with pytest.warns(NonFiniteWeightWarning):
        hf_to_meta(directory, tmp_path / "meta", progress=False)
    with pytest.warns(NonFiniteWeightWarning, match=rf"meta: tensor {name} has 1 NaN or infinite"):
        list(read_meta(tmp_path / "meta").stream())
    # from_pretrained of the Meta directory reports it once (its own warning), not twice
    with pytest.warns(NonFiniteWeightWarning) as record:
        LlamaForCausalLM.from_pretrained(tmp_path / "meta")
    assert len([w for w in record if issubclass(w.category, NonFiniteWeightWarning)]) == 1


def test_clean_checkpoint_loads_without_warnings(tmp_path):
    directory = saved(tmp_path)
    with warnings_as_errors():
        LlamaForCausalLM.from_pretrained(directory)


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightWarning)
        yield


# ---------------------------------------------------------------------------------------------- index files
def _indexed(tmp_path: Path, weight_map) -> Path:
    directory = saved(tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.mark.parametrize(("weight_map", "message"), [
    (["model.safetensors"], r"needs a 'weight_map' object of tensor name -> shard file, got list"),
    ({"model.norm.weight": 3}, r"weight_map entry 'model.norm.weight' must name a shard file, got 3"),
    ({"model.norm.weight": None}, r"weight_map entry 'model.norm.weight' must name a shard file, got None"),
])
def test_malformed_weight_map_is_a_clear_error(tmp_path, weight_map, message):
    directory = _indexed(tmp_path, weight_map)
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json.*{message}"):
        LlamaForCausalLM.from_pretrained(directory)


def test_shard_paths_outside_the_checkpoint_are_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"model.norm.weight": torch.ones(64)}, outside)
    for name in ("../outside.safetensors", str(outside)):
        directory = _indexed(tmp_path / name.replace("/", "_"), {"model.norm.weight": name})
        with pytest.raises(ValueError, match=r"index\.json: shard .* is outside the checkpoint directory"):
            LlamaForCausalLM.from_pretrained(directory)
    directory = _indexed(tmp_path / "link", {"model.norm.weight": "link.safetensors"})
    (directory / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"shard 'link\.safetensors' resolves to .*outside\.safetensors, outside"):
        LlamaForCausalLM.from_pretrained(directory)
    # a single model.safetensors that is a symlink out of the directory is refused the same way
    single = saved(tmp_path / "single")
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"resolves to .* outside the checkpoint directory"):
        LlamaForCausalLM.from_pretrained(single)


def test_hub_snapshot_links_into_its_blobs_but_no_further(tmp_path):
    """A hub cache snapshot's files are symlinks into the repository's blob store: those load; a link out of
    the repository, or an index entry climbing out of the snapshot, does not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    model = random_model(small_config())
    model.save_pretrained(tmp_path / "plain")
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in (tmp_path / "plain").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    loaded = LlamaForCausalLM.from_pretrained(snapshot)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../blobs/model.safetensors"}}))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        LlamaForCausalLM.from_pretrained(snapshot)
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "plain" / "model.safetensors")
    with pytest.raises(ValueError, match=r"resolves to .* outside the checkpoint directory"):
        LlamaForCausalLM.from_pretrained(snapshot)


def test_meta_rank_file_linking_out_of_the_checkpoint_is_refused(tmp_path):
    saved(tmp_path, "hf")
    hf_to_meta(tmp_path / "hf", tmp_path / "meta", progress=False)
    (tmp_path / "meta" / "consolidated.00.pth").rename(tmp_path / "elsewhere.pth")
    (tmp_path / "meta" / "consolidated.00.pth").symlink_to(tmp_path / "elsewhere.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth' resolves to .*elsewhere\.pth, outside"):
        read_meta(tmp_path / "meta")
