"""Conversions stream from memory-mapped inputs: the peak RSS of a conversion grows by at most the largest
input shard plus the largest output shard, plus 10%, whatever the size of the whole checkpoint.

Each conversion runs in a fresh interpreter so that its peak RSS (VmHWM, read from /proc/self/status) is
its own: ``ru_maxrss`` would carry over the parent's high-water mark across fork + exec. The baseline is
the RSS after ``import torch, checkpoints_convert, llama_core``. The synthetic checkpoint (a random fp32
model with few but wide tensors, ~320 MB) is built once for the module, saved in 120 MB HF shards, and
split into 2 Meta model-parallel ranks of ~160 MB each. Every output is loaded back and compared bit for
bit with the source model, so a conversion cannot pass by writing nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from checkpoints_convert import hf_to_meta
from llama_core import LlamaForCausalLM
from tests.conftest import REPO, random_model, small_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

SLACK = 1.10  # peak growth <= SLACK * (largest input shard + largest output shard)
MIN_TOTAL = 300 * 10**6
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0, 4000, 15999]])

CHILD = textwrap.dedent("""
    import json, sys

    import torch

    import checkpoints_convert
    import llama_core


    def status_bytes(field):  # this process's own counters (Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


    # Peak is VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's high-water mark over
    # fork + exec. The baseline is the RSS now, after the imports (stricter than the peak so far).
    spec = json.loads(sys.argv[1])
    convert = getattr(checkpoints_convert, spec["fn"])  # the package is lazy: import the converter first
    llama_core.LlamaForCausalLM
    baseline = status_bytes("VmRSS")
    convert(*spec["args"], progress=False, **spec["kwargs"])
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM")}))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A ~320 MB fp32 model saved as HF in 120 MB shards and as Meta in 2 ranks, with its state and logits."""
    config = small_config(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=128)
    model = random_model(config)
    with torch.no_grad():  # distinct norm weights, so a misplaced norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("convert-memory")
    hf = model.save_pretrained(root / "hf", max_shard_size="120MB")
    meta = hf_to_meta(hf, root / "meta", num_shards=2, progress=False)
    with torch.no_grad():
        logits = model(IDS).logits
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return {"hf": hf, "meta": Path(meta), "state": state, "logits": logits}


def files(directory: Path, pattern: str) -> list[Path]:
    found = sorted(directory.glob(pattern))
    assert found, f"no {pattern} in {directory}"
    return found


def largest(directory: Path, pattern: str) -> int:
    return max(p.stat().st_size for p in files(directory, pattern))


def run_child(fn: str, *args, **kwargs) -> dict:
    spec = json.dumps({"fn": fn, "args": [str(a) for a in args], "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-c", CHILD, spec], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_peak(result: dict, in_shard: int, out_shard: int, what: str) -> None:
    grown = result["peak"] - result["baseline"]
    bound = SLACK * (in_shard + out_shard)
    print(f"{what}: peak - baseline = {grown / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB "
          f"(input shard {in_shard / 1e6:.0f} MB + output shard {out_shard / 1e6:.0f} MB + 10%)")
    assert grown <= bound, (f"{what} grew the RSS by {grown / 1e6:.0f} MB; the bound is {bound / 1e6:.0f} MB "
                            f"= 1.1 x ({in_shard / 1e6:.0f} MB largest input shard + {out_shard / 1e6:.0f} MB "
                            "largest output shard)")


def assert_weights_equal(directory: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> LlamaForCausalLM:
    loaded = LlamaForCausalLM.from_pretrained(directory, dtype="auto")
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for name, want in state.items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], want.to(dtype)), name
    return loaded


def test_synthetic_checkpoint_is_large_and_sharded(source):
    hf_files, meta_files = files(source["hf"], "model-*.safetensors"), files(source["meta"], "consolidated.*.pth")
    assert len(hf_files) >= 3 and len(meta_files) == 2
    assert sum(p.stat().st_size for p in hf_files) >= MIN_TOTAL
    assert sum(p.stat().st_size for p in meta_files) >= MIN_TOTAL


def test_meta_to_hf_peak_rss(source, tmp_path):
    out = tmp_path / "hf"
    result = run_child("meta_to_hf", source["meta"], out, max_shard_size="100MB")
    check_peak(result, largest(source["meta"], "consolidated.*.pth"), largest(out, "*.safetensors"), "meta -> hf")
    assert len(files(out, "model-*.safetensors")) >= 4
    model = assert_weights_equal(out, source["state"], torch.float32)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, source["logits"])


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_reshard_peak_rss(source, tmp_path, dtype):
    out = tmp_path / "hf"
    kwargs = {"max_shard_size": "80MB"} | ({"dtype": dtype} if dtype else {})
    result = run_child("reshard", source["hf"], out, **kwargs)
    check_peak(result, largest(source["hf"], "*.safetensors"), largest(out, "*.safetensors"),
               f"reshard to 80MB shards{f' as {dtype}' if dtype else ''}")
    assert len(files(out, "model-*.safetensors")) >= (3 if dtype else 4)
    assert_weights_equal(out, source["state"], torch.bfloat16 if dtype else torch.float32)


def test_hf_to_meta_peak_rss(source, tmp_path):
    out = tmp_path / "meta"
    result = run_child("hf_to_meta", source["hf"], out, num_shards=2)
    check_peak(result, largest(source["hf"], "*.safetensors"), largest(out, "consolidated.*.pth"), "hf -> meta")
    ranks = files(out, "consolidated.*.pth")
    assert len(ranks) == 2
    rank0 = torch.load(ranks[0], weights_only=True, mmap=True)
    assert rank0["layers.0.attention.wq.weight"].shape == (512, 1024)  # column-parallel half
    assert rank0["layers.0.feed_forward.w2.weight"].shape == (1024, 1408)  # row-parallel half
    del rank0
    assert json.loads((out / "params.json").read_text())["n_layers"] == 4
    assert_weights_equal(out, source["state"], torch.float32)  # read back (merged, permuted) from Meta
