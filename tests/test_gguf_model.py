"""A real chat model from llama.cpp: SmolLM2-135M-Instruct as a Q4_1/Q8_0 GGUF, read by from_pretrained.

transformers reading the same file (through the gguf package) is the independent reference for the weights,
the config and the forward; memory is measured in a fresh interpreter.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_core import LlamaForCausalLM
from tests.conftest import REPO, assets_dir

pytest.importorskip("gguf")
SMOLLM2 = assets_dir() / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = SMOLLM2 / GGUF_NAME
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not found (set LLAMA_CORE_ASSETS)")

# Token ids of varied text under SmolLM2's vocabulary (any ids in range would do for the forward).
PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712],
           [504, 3458, 282, 4649, 314], [2], list(range(100, 400, 7))]


@pytest.fixture(scope="module")
def ours():
    return LlamaForCausalLM.from_pretrained(GGUF)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def test_config_from_metadata(ours):
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.max_position_embeddings) == (30, 576, 1536, 9, 3, 64, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == 1e-5  # float32 9.99999974738e-06 in the file, read back as the decimal it was
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_logits_equal_transformers(ours, reference):
    """Same dequantised weights, same un-permuted q/k: fp32 logits within 1e-4 on every prompt."""
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            diff = (ours(x).logits - reference(x).logits).abs().max().item()
            assert diff <= 1e-4, (ids[:5], diff)


def test_weights_equal_transformers(ours, reference):
    ref = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_greedy_chat_reply_equals_transformers(ours, reference):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=GGUF_NAME)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    ref = reference.generate(ids, max_new_tokens=20, do_sample=False)
    out = ours.generate(ids, max_new_tokens=20)
    assert out.tolist() == ref.tolist()
    assert "The capital of France is Paris." in tok.decode(out[0, ids.shape[1]:])


def test_path_forms(tmp_path, ours):
    """A .gguf file, a directory holding exactly one, gguf_file= inside a directory; several -> an error."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / GGUF_NAME).symlink_to(GGUF)
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = ours(x).logits
        for model in (LlamaForCausalLM.from_pretrained(tmp_path / "one"),
                      LlamaForCausalLM.from_pretrained(SMOLLM2, gguf_file=GGUF_NAME)):
            assert torch.equal(model(x).logits, expected)
    (tmp_path / "one" / "copy.gguf").symlink_to(GGUF)
    with pytest.raises(ValueError, match="several GGUF files"):
        LlamaForCausalLM.from_pretrained(tmp_path / "one")
    with pytest.raises(FileNotFoundError, match="no GGUF file 'nope\\.gguf'"):
        LlamaForCausalLM.from_pretrained(tmp_path / "one", gguf_file="nope.gguf")


def test_bf16_and_int8_weight_only_compose(ours):
    """Dequantised straight into the requested dtype, and quantised again while loading."""
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = ours(x).logits
        bf16 = LlamaForCausalLM.from_pretrained(GGUF, dtype="bfloat16")
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16.model.norm.weight, ours.model.norm.weight.bfloat16())
        int8 = LlamaForCausalLM.from_pretrained(GGUF, quantize="int8-weight-only")
        assert type(int8.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
        err = (int8(x).logits - full).norm() / full.norm()
    assert err < 0.05, err  # weight-only int8 of already 4-bit weights: a few percent at most


MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import llama_core

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    # Code, not loading, before the baseline: the gguf package, and what building any model on the meta
    # device imports (torch._dynamo, ~80 MB).
    import gguf, checkpoints_convert.gguf
    with torch.device("meta"):
        llama_core.LlamaForCausalLM(llama_core.LlamaConfig.from_preset("tiny"))
    baseline = status_bytes("VmRSS")
    model = llama_core.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # touch every page (no upcast copies)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"grown": status_bytes("VmHWM") - baseline, "model": model_bytes}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_within_bound(dtype):
    """Tensors are read and dequantised one at a time: the load adds at most 1.3x the dequantised model."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(GGUF), dtype], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = result["grown"] / result["model"]
    assert ratio <= 1.3, f"{dtype}: loading took {result['grown'] / 1e6:.0f} MB for a {result['model'] / 1e6:.0f} MB model"


def test_cli_generate_and_chat_from_one_file(tmp_path, monkeypatch, capsys):
    """`llama-core generate --model file.gguf --chat` and `llama-core chat` work from the single file."""
    from llama_core.cli import main

    assert main(["generate", "--model", str(GGUF), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    assert "The capital of France is Paris." in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n"))
    assert main(["chat", "--model", str(GGUF), "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
