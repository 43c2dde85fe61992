"""GGUF conversion of real models, with their tokenizers: SmolLM2's GGUF -> HF -> GGUF, stories260K HF -> GGUF,
checked against transformers, against the original weights and, where the llama.cpp binding from
../shared/wheels is installed, against llama.cpp itself running the files we wrote."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from checkpoints_convert import gguf_to_hf, hf_to_gguf, llama2c_to_hf
from llama_core import LlamaForCausalLM, Tokenizer
from tests.conftest import REPO, assets_dir

gguf = pytest.importorskip("gguf")
SMOLLM2 = assets_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = assets_dir() / "stories260K"
TEXTS = ["Hello world", "The capital of France is Paris.", "def f(x):\n    return x  # code", "日本語のテキスト 🙂",
         "  spaces   and\n\nnewlines\t", "Once upon a time, there was a little girl named Lily."]
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} not found (set LLAMA_CORE_ASSETS)")
needs_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260K not found")


def llama_cpp_greedy(path, prompt: list[int], steps: int) -> list[int] | None:
    """llama.cpp's greedy continuation of ``prompt``, in a child process (None when the binding is absent)."""
    code = ("import json, sys, llama_cpp\n"
            "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False, seed=0)\n"
            "out = []\n"
            "for t in llm.generate(json.loads(sys.argv[2]), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, "
            "repeat_penalty=1.0):\n"
            "    out.append(t)\n"
            "    if len(out) == int(sys.argv[3]): break\n"
            "print(json.dumps(out))\n")
    try:
        __import__("llama_cpp")
    except Exception:  # ImportError, or an illegal instruction surfacing as an OSError on another CPU
        return None
    import json

    proc = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(prompt), str(steps)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    """SmolLM2's GGUF as an HF checkpoint (fp32, tokenizer.json, tokenizer_config.json with the template)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not found")
    return gguf_to_hf(SMOLLM2, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)


@needs_smollm2
def test_gguf_to_hf_loads_in_transformers(smollm2_hf, transformers_module):
    """transformers reads our HF export (weights, tokenizer, chat template) and agrees with the GGUF."""
    ours = LlamaForCausalLM.from_pretrained(SMOLLM2)
    ref = transformers_module.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    ref_tok = transformers_module.AutoTokenizer.from_pretrained(smollm2_hf)
    tok = Tokenizer.from_pretrained(SMOLLM2)
    for text in TEXTS:
        assert ref_tok(text).input_ids == tok.encode(text), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x).logits - ref(x).logits).abs().max() <= 1e-4


@needs_smollm2
def test_smollm2_gguf_hf_gguf_round_trip(smollm2_hf, tmp_path):
    """GGUF (Q4_1) -> HF (fp32) -> GGUF (f32): the dequantised weights come back bit for bit, the vocabulary
    and template too; llama.cpp runs the file we wrote and decodes greedily as we do."""
    out = hf_to_gguf(smollm2_hf, tmp_path / "smollm2-f32.gguf", "f32", progress=False)
    original = LlamaForCausalLM.from_pretrained(SMOLLM2)
    again = LlamaForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(original.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tok, tok_again = Tokenizer.from_pretrained(SMOLLM2), Tokenizer.from_pretrained(out)
    assert tok_again.chat_template == tok.chat_template
    for text in TEXTS:
        assert tok_again.encode(text) == tok.encode(text)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    ours = again.generate(torch.tensor([prompt]), max_new_tokens=32, eos_token_id=[])[0, len(prompt):].tolist()
    assert "Paris" in tok.decode(ours)
    theirs = llama_cpp_greedy(out, prompt, 32)
    if theirs is None:
        pytest.skip("llama_cpp is not installed (see ../shared/wheels/README.md)")
    assert theirs == ours


@needs_stories
def test_stories260k_hf_to_gguf_runs_in_llama_cpp(tmp_path):
    """A sentencepiece model: hf-to-gguf through the CLI, read back (weights, tokenizer), and llama.cpp tells
    the same story from BOS token for token."""
    hf = llama2c_to_hf(STORIES / "stories260K.bin", tmp_path / "hf", tokenizer=STORIES / "tok512.model",
                       progress=False)
    out = tmp_path / "stories.gguf"
    proc = subprocess.run([sys.executable, "-m", "checkpoints_convert", "hf-to-gguf", "--input", str(hf), "--output",
                           str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    model, ref = LlamaForCausalLM.from_pretrained(out), LlamaForCausalLM.from_pretrained(hf)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tok, ref_tok = Tokenizer.from_pretrained(out), Tokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text), text
    ours = model.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=32, eos_token_id=[])[0, 1:].tolist()
    assert tok.decode(ours).startswith("Once upon a time, there was a little girl named Lily.")
    # ... and back: HF -> GGUF (f32) -> HF files is bit-exact, the tokenizer comes back as tokenizer.json
    back = gguf_to_hf(out, tmp_path / "back", progress=False)
    for (name, a), (_, b) in zip(LlamaForCausalLM.from_pretrained(back).state_dict().items(), ref.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    back_tok = Tokenizer.from_pretrained(back)
    assert (back / "tokenizer.json").is_file() and all(back_tok.encode(t) == ref_tok.encode(t) for t in TEXTS)
    theirs = llama_cpp_greedy(out, [tok.bos_id], 32)
    if theirs is None:
        pytest.skip("llama_cpp is not installed (see ../shared/wheels/README.md)")
    assert theirs == ours


@needs_stories
def test_hf_to_gguf_refuses_without_a_tokenizer_and_keeps_outputs(tmp_path):
    hf = llama2c_to_hf(STORIES / "stories260K.bin", tmp_path / "hf", progress=False)  # no tokenizer copied in
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        hf_to_gguf(hf, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "old.gguf").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_gguf(hf, tmp_path / "old.gguf", tokenizer=STORIES / "tok512.model", progress=False)
    assert (tmp_path / "old.gguf").read_bytes() == b"keep me"
    hf_to_gguf(hf, tmp_path / "old.gguf", "q8_0", force=True, tokenizer=STORIES / "tok512.model", progress=False)
    assert LlamaForCausalLM.from_pretrained(tmp_path / "old.gguf").config.vocab_size == 512


@needs_stories
def test_fine_tune_from_a_gguf(tmp_path):
    """`llama-core train --init-from model.gguf`: weights and vocabulary from the one file; the HF export
    carries the vocabulary as tokenizer files and continues the fine-tuned model."""
    from llama_core.cli import main

    hf = llama2c_to_hf(STORIES / "stories260K.bin", tmp_path / "hf", tokenizer=STORIES / "tok512.model",
                       progress=False)
    model_file = hf_to_gguf(hf, tmp_path / "stories.gguf", progress=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("Once upon a time, there was a cat. The cat liked milk.\n\n" * 20)
    out = tmp_path / "run"
    assert main(["train", "--init-from", str(model_file), "--data", str(tmp_path / "data"), "--output-dir", str(out),
                 "--seq-len", "64", "--global-batch-size", "2", "--micro-batch-size", "1", "--max-steps", "3",
                 "--lr", "1e-3", "--no-progress"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (out / "hf").iterdir()}
    assert not list((out / "hf").glob("*.gguf"))
    tuned, tok = LlamaForCausalLM.from_pretrained(out / "hf"), Tokenizer.from_pretrained(out / "hf")
    base = LlamaForCausalLM.from_pretrained(model_file)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert tok.encode("The cat liked milk.") == Tokenizer.from_pretrained(model_file).encode("The cat liked milk.")
