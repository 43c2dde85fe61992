"""from_pretrained holds one copy of the weights: peak RSS while loading stays within 1.3x the checkpoint.

Each load runs in a fresh interpreter, so its peak RSS (VmHWM) is its own. The baseline is the RSS after
``import torch, llama_core``; every parameter is then summed so memory-mapped pages count too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, random_model, small_config

BOUND = 1.3
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0, 4000, 7999]])

CHILD = textwrap.dedent("""
    import json, sys

    import torch

    import llama_core


    def status_bytes(field):  # this process's own counters (Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


    # Peak is VmHWM, not ru_maxrss: on Linux ru_maxrss carries the parent's high-water mark over fork + exec,
    # so a large pytest process would mask the child's own peak. The baseline is the RSS now (stricter
    # than the peak so far).
    ckpt, out = sys.argv[1], sys.argv[2]
    llama_core.LlamaForCausalLM.from_pretrained  # the package is lazy: import the loading code before the baseline
    baseline = status_bytes("VmRSS")
    model = llama_core.LlamaForCausalLM.from_pretrained(ckpt)
    untouched_peak = status_bytes("VmHWM")  # mapped pages not read yet (the NaN/inf check reads the files)
    with torch.no_grad():
        checksum = sum(float(p.sum()) for p in model.parameters())  # touch every page
    loaded_peak = status_bytes("VmHWM")
    with torch.no_grad():
        logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
    torch.save({"baseline": baseline, "peak": loaded_peak, "untouched_peak": untouched_peak, "checksum": checksum,
                "logits": logits}, out)
""")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ~680 MB fp32 checkpoint saved whole and in 50 MB shards, with the saved model's logits."""
    config = small_config(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=128)
    model = random_model(config)
    root = tmp_path_factory.mktemp("memory")
    whole = model.save_pretrained(root / "whole")
    sharded = model.save_pretrained(root / "sharded", max_shard_size="50MB")
    with torch.no_grad():
        expected = model(IDS).logits
    del model
    return {"whole": whole, "sharded": sharded}, expected


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("layout", ["whole", "sharded"])
def test_peak_rss_within_bound(checkpoints, tmp_path, layout):
    """Loading (and touching every weight) adds at most 1.3x the checkpoint's bytes to the peak RSS,
    and the loaded model gives the saved model's logits."""
    dirs, expected = checkpoints
    ckpt = dirs[layout]
    size = weights_bytes(ckpt)
    assert size >= 600 * 10**6
    if layout == "sharded":
        assert len(list(ckpt.glob("model-*.safetensors"))) >= 5
    out = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), json.dumps(IDS.tolist())],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = torch.load(out, weights_only=True)
    grown = result["peak"] - result["baseline"]
    assert grown <= BOUND * size, (f"loading took {grown / 1e6:.0f} MB over the baseline for a "
                                   f"{size / 1e6:.0f} MB checkpoint ({grown / size:.2f}x > {BOUND}x)")
    assert torch.equal(result["logits"], expected)
    # The default NaN/inf check reads the shards through file reads, not through the mapping: a load by
    # itself leaves the weights' pages to the first forward (reading them through the mapping made the
    # whole checkpoint resident: 1.24x its size at this point).
    untouched = result["untouched_peak"] - result["baseline"]
    assert untouched <= 0.3 * size, f"the load alone took {untouched / 1e6:.0f} MB ({untouched / size:.2f}x)"
