"""Real data: karpathy's trained stories260K (llama2.c v0 format, ../shared/assets) converted to HF loads
in llama_core and in transformers, and greedy decoding from BOS tells the known story."""

from __future__ import annotations

import hashlib

import pytest
import torch

from checkpoints_convert.cli import main as convert_main
from llama_core import DynamicCache, LlamaForCausalLM
from tests.conftest import assets_dir

STORIES = assets_dir() / "stories260K"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
         "she saw a big, red ball. She wanted to play with it, but it was too high.")
pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                                reason=f"stories260K assets not found under {STORIES} (set LLAMA_CORE_ASSETS)")


@torch.no_grad()
def greedy(model: LlamaForCausalLM, steps: int) -> list[int]:
    ids, cache = [1], DynamicCache()  # BOS
    logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
    for _ in range(steps):
        ids.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([ids[-1:]]), past_key_values=cache, use_cache=True).logits
    return ids


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "hf"
    before = hashlib.sha256((STORIES / "stories260K.bin").read_bytes()).hexdigest()
    assert convert_main(["llama2c-to-hf", "--input", str(STORIES / "stories260K.bin"), "--output", str(out),
                         "--tokenizer", str(STORIES / "tok512.model"), "--no-progress"]) == 0
    assert hashlib.sha256((STORIES / "stories260K.bin").read_bytes()).hexdigest() == before
    return out


def test_converted_stories_tell_the_known_story(converted):
    spm = pytest.importorskip("sentencepiece")
    assert (converted / "tokenizer.model").is_file()
    model = LlamaForCausalLM.from_pretrained(converted)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 4
    ids = greedy(model, 80)
    text = spm.SentencePieceProcessor(model_file=str(converted / "tokenizer.model")).decode(ids)
    assert text.startswith(STORY), text


def test_transformers_generates_the_same_tokens(converted, transformers_module):
    ours = greedy(LlamaForCausalLM.from_pretrained(converted), 80)
    ref = transformers_module.LlamaForCausalLM.from_pretrained(converted).eval()
    out = ref.generate(torch.tensor([[1]]), max_new_tokens=80, do_sample=False, min_new_tokens=80,
                       eos_token_id=None, pad_token_id=0)
    assert out[0].tolist() == ours


@torch.no_grad()
def test_from_pretrained_reads_the_bin_file_directly(converted):
    ids = torch.tensor([[1, 403, 407, 261, 378, 306]])
    direct = LlamaForCausalLM.from_pretrained(STORIES / "stories260K.bin")(ids).logits
    torch.testing.assert_close(direct, LlamaForCausalLM.from_pretrained(converted)(ids).logits, atol=0, rtol=0)
