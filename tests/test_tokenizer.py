"""Tokenizer parity against the libraries and recipes it wraps, on the real Llama tokenizer files.

References: `sentencepiece` itself (Llama 2, stories tok512), Meta's Llama 3 tiktoken recipe rebuilt here from
tiktoken directly, the Meta-Llama-3-8B-Instruct `tokenizer.json` through `tokenizers`, transformers'
`apply_chat_template`, Meta's Llama 2 `chat_completion` construction, and llama2.c's own `.bin` vocabulary.
Tests needing a file from the assets folder skip when it is absent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch

from llama_core.tokenizer import Tokenizer, tiktoken_llama3
from tests.conftest import assets_dir

LLAMA2 = assets_dir() / "llama2-tokenizer" / "tokenizer.model"
LLAMA3_TIKTOKEN = assets_dir() / "llama3-tiktoken" / "tokenizer.model"
LLAMA3_HF = assets_dir() / "llama3-hf"
TOK512 = assets_dir() / "stories260K" / "tok512.model"
TOK512_BIN = assets_dir() / "stories260K" / "tok512.bin"

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "    four leading spaces",
    "trailing spaces   ",
    " one leading space",
    "\ttabs\tand\r\nCRLF line\r\n",
    "numbers 1234567890 3.14159 -42 1e-9 ١٢٣ ½",
    "ünïcödé café naïve Straße ÆØÅ",
    "日本語のテキストと中文文本",
    "한국어 텍스트입니다",
    "Ελληνικά Русский עברית العربية हिन्दी",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵!",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zalgo z\u0351\u0352\u0353",
    "control \x00\x01\x07\x1b[31m chars\x7f",
    "whitespace runs:      \n\n\n\t\t  \u00a0\u2003\u3000 end",
    "I'm can't we'll they'd you're it's HE'S O'Neil",
    "rare: 𓀀 𐍈 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞≤≠ ⇒ \ufffd",
    "<|eot_id|> and <s> </s> [INST] <<SYS>> are only text here",
    "",
    " ",
    "\n",
    "a",
    "x" * 700 + " " * 300 + "y\n" * 50,
]
MESSAGES = [
    {"role": "system", "content": "  You are a terse assistant.\n"},
    {"role": "user", "content": "What is 2 + 2? 🤔"},
    {"role": "assistant", "content": "4.  "},
    {"role": "user", "content": "\nAnd in French, café-style?"},
]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test asset {path} is absent (set LLAMA_CORE_ASSETS)")
    return path


@pytest.fixture(scope="module")
def sp2():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(need(LLAMA2)))


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer.from_pretrained(need(LLAMA2).parent)


@pytest.fixture(scope="module")
def tok512():
    return Tokenizer.from_pretrained(need(TOK512))


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_pretrained(need(LLAMA3_TIKTOKEN).parent)


@pytest.fixture(scope="module")
def llama3_hf():
    return Tokenizer.from_pretrained(need(LLAMA3_HF / "tokenizer.json").parent)


@pytest.fixture(scope="module")
def hf_raw():
    """The asset's tokenizer.json through `tokenizers` directly."""
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(need(LLAMA3_HF / "tokenizer.json")))


# ---- Meta's Llama 3 recipe, written out independently of llama_core.tokenizer.tiktoken_llama3 -------------

def meta_split(s: str, max_run: int):
    """Meta's `_split_whitespaces_or_nonwhitespaces`, char by char."""
    current_len, current_is_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        is_space = s[i].isspace()
        if current_is_space ^ is_space:
            current_len, current_is_space = 1, is_space
        else:
            current_len += 1
            if current_len > max_run:
                yield s[start:i]
                start, current_len = i, 1
    yield s[start:]


@pytest.fixture(scope="module")
def meta_llama3():
    """(encode(text, allow_special), special_tokens) built from tiktoken as Meta's llama-models does."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in need(LLAMA3_TIKTOKEN).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    special = {name: len(ranks) + i for i, name in enumerate(names)}
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    enc = tiktoken.Encoding(name="meta", pat_str=pat, mergeable_ranks=ranks, special_tokens=special)

    def encode(s: str, allow_special: bool = False) -> list[int]:
        out = []
        for i in range(0, len(s), 400_000):
            for sub in meta_split(s[i:i + 400_000], 25_000):
                out += enc.encode(sub, allowed_special="all" if allow_special else set(), disallowed_special=())
        return out

    encode.enc = enc
    return encode, special


# ---- Llama 2 sentencepiece ------------------------------------------------------------------------------------

def test_llama2_ids_match_sentencepiece(llama2, sp2):
    assert llama2.kind == "sentencepiece" and llama2.vocab_size == 32000
    assert (llama2.bos_id, llama2.eos_id, llama2.stop_ids, llama2.pad_id) == (1, 2, [2], 2)
    for text in CORPUS:
        ref = sp2.encode(text)
        assert llama2.encode(text) == [1, *ref], text
        assert llama2.encode(text, add_bos=False, add_eos=True) == [*ref, 2], text


def test_llama2_round_trip(llama2, sp2):
    for text in CORPUS:
        ids = llama2.encode(text)
        assert llama2.decode(ids[1:]) == text, text
        assert llama2.decode(ids) == "<s>" + text  # special tokens are kept as text unless skipped
        assert llama2.decode(ids, skip_special_tokens=True) == sp2.decode(ids) == text


@pytest.mark.parametrize("name", ["llama2", "tok512"])
def test_sentencepiece_decode_matches_reference_on_random_ids(name, request):
    """Any ids, including lone byte-fallback pieces (invalid UTF-8), unk and control tokens."""
    spm = pytest.importorskip("sentencepiece")
    tok = request.getfixturevalue(name)
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2 if name == "llama2" else TOK512))
    rng = random.Random(0)
    bytes_ids = [i for i in range(tok.vocab_size) if sp.is_byte(i)]
    space = sp.piece_to_id("▁")  # decodes to nothing when first; tok512 (remove_extra_whitespaces) strips on
    for _ in range(300):
        pool = bytes_ids if rng.random() < 0.3 else range(tok.vocab_size)
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(rng.randrange(12))]
        ids = [*[rng.choice([1, 2, space]) for _ in range(rng.randrange(3))], *ids]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids


def test_sentencepiece_special_text(llama2, sp2):
    text = "a</s>b<s>"
    assert llama2.encode(text, add_bos=False) == sp2.encode(text)  # nothing is special in user text
    assert llama2.encode(text, add_bos=False, allow_special=True) == [*sp2.encode("a"), 2, *sp2.encode("b"), 1]
    assert llama2.special_ids == {1, 2} and llama2.is_special(2) and not llama2.is_special(0)


def meta_llama2_chat(sp, dialog):
    """Meta's llama/generation.py chat_completion prompt construction (Llama 2)."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        first = {"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]}
        dialog = [first, *dialog[2:]]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        tokens += [sp.bos_id(), *sp.encode(f"{b_inst} {prompt['content'].strip()} {e_inst} {answer['content'].strip()} "),
                   sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id(), *sp.encode(f"{b_inst} {dialog[-1]['content'].strip()} {e_inst}")]
    return tokens


def test_llama2_chat_format_matches_meta(llama2, sp2):
    assert llama2.chat_template is None
    assert llama2.apply_chat_template(MESSAGES) == meta_llama2_chat(sp2, MESSAGES)
    finished = MESSAGES[:3]
    assert llama2.apply_chat_template(finished, add_generation_prompt=False) == meta_llama2_chat(sp2, finished)
    text = llama2.apply_chat_template(MESSAGES, tokenize=False)
    # Meta strips the merged first message, not the system prompt inside it.
    assert text == ("<s>[INST] <<SYS>>\n  You are a terse assistant.\n\n<</SYS>>\n\nWhat is 2 + 2? 🤔 [/INST] 4. </s>"
                    "<s>[INST] And in French, café-style? [/INST]")
    with pytest.raises(ValueError, match="alternating"):
        llama2.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(TypeError, match="content"):
        llama2.apply_chat_template([{"role": "user", "content": ["parts"]}])


# ---- Llama 3: tiktoken and tokenizer.json --------------------------------------------------------------------

def test_llama3_special_tokens(llama3, llama3_hf, meta_llama3):
    _, meta_special = meta_llama3
    assert llama3.kind == "tiktoken" and llama3.vocab_size == len(llama3) == 128256
    assert llama3.special_tokens == meta_special
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                "<|reserved_special_token_2|>": 128011, "<|reserved_special_token_246|>": 128255}
    assert {name: llama3.token_to_id(name) for name in expected} == expected
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert sorted(llama3.stop_ids) == [128001, 128008, 128009]
    assert llama3.special_ids == set(range(128000, 128256)) and not llama3.is_special(127999)
    # The HF file is Llama 3.0: fewer named slots (128004/5 and 128008 are reserved there, and the reserved
    # numbering after them shifts), but the tokens both name sit at the same ids.
    hf_added = {t["content"]: t["id"] for t in json.loads((LLAMA3_HF / "tokenizer.json").read_text())["added_tokens"]}
    shared = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert {n: hf_added[n] for n in shared} == {n: meta_special[n] for n in shared}
    assert set(hf_added.values()) == set(meta_special.values())
    assert llama3_hf.vocab_size == 128256 and llama3_hf.special_ids == llama3.special_ids
    assert (llama3_hf.bos_id, llama3_hf.eos_id) == (128000, 128001)
    assert sorted(llama3_hf.stop_ids) == [128001, 128009]  # no <|eom_id|> in Llama 3.0
    assert llama3_hf.pad_id == 128001  # no pad or <|finetune_right_pad_id|> token there: EOS


def test_llama3_ids_match_meta_recipe_and_tokenizer_json(llama3, llama3_hf, meta_llama3, hf_raw):
    meta, _ = meta_llama3
    for text in [*CORPUS, "<|begin_of_text|>hi<|eot_id|><|start_header_id|>"]:
        ref = meta(text)
        assert llama3.encode(text) == [128000, *ref], text
        assert llama3.encode(text, add_bos=False, add_eos=True) == [*ref, 128001], text
        # The two real Llama 3 files agree on ids; this tokenizer.json's post-processor adds no BOS (transformers
        # neither), Meta's recipe does.
        assert llama3_hf.encode(text, add_bos=True) == [128000, *ref], text
        assert llama3_hf.encode(text) == ref, text
        hf_raw.encode_special_tokens = True
        assert hf_raw.encode(text, add_special_tokens=False).ids == ref, text
        special = meta(text, allow_special=True)
        assert llama3.encode(text, add_bos=False, allow_special=True) == special, text
        assert llama3_hf.encode(text, add_bos=False, allow_special=True) == special, text
        hf_raw.encode_special_tokens = False
        assert hf_raw.encode(text, add_special_tokens=False).ids == special, text


def test_special_text_is_not_special_by_default(llama3, llama3_hf):
    for tok in (llama3, llama3_hf):
        plain = tok.encode("<|eot_id|>", add_bos=False)
        assert len(plain) > 1 and not any(map(tok.is_special, plain))
        assert tok.encode("<|eot_id|>", add_bos=False, allow_special=True) == [128009]
        assert tok.decode(plain) == "<|eot_id|>"


def test_llama3_round_trip_and_decode_parity(llama3, llama3_hf, meta_llama3, hf_raw):
    meta, _ = meta_llama3
    for text in CORPUS:
        for tok in (llama3, llama3_hf):
            ids = tok.encode(text, add_bos=True)
            assert tok.decode(ids) == "<|begin_of_text|>" + text, text
            assert tok.decode(ids, skip_special_tokens=True) == text, text
    rng = random.Random(1)
    partial = partial_utf8_ids(llama3)
    assert len(partial) > 1000  # byte-level BPE has many tokens that end or start mid-character
    for _ in range(300):  # arbitrary ids, rich in partial UTF-8 pieces and special tokens
        ids = [rng.choice(partial) if rng.random() < 0.5 else rng.randrange(128256) if rng.random() < 0.8
               else rng.randrange(128000, 128256) for _ in range(rng.randrange(10))]
        assert llama3.decode(ids) == meta.enc.decode(ids), ids
        assert llama3_hf.decode(ids) == hf_raw.decode(ids, skip_special_tokens=False), ids
        # The two files name the reserved specials differently (Llama 3.1 vs 3.0); without them they agree.
        assert llama3_hf.decode(ids, skip_special_tokens=True) == hf_raw.decode(ids, skip_special_tokens=True) \
            == llama3.decode(ids, skip_special_tokens=True), ids
    assert llama3.decode(torch.tensor([9906, 1917])) == "Hello world"


@pytest.mark.parametrize("text", ["a" * 300_000, " " * 300_000, ("ab" * 1000 + " " * 30_000) * 12],
                         ids=["300k-letters", "300k-spaces", "long-runs"])
def test_llama3_pathological_inputs_are_fast(llama3, meta_llama3, text):
    """Guard against quadratic behaviour (Meta's 400k / 25k chunking), not a benchmark."""
    meta, _ = meta_llama3
    start = time.perf_counter()
    ids = llama3.encode(text, add_bos=False)
    assert time.perf_counter() - start < 30
    assert ids == meta(text)
    assert llama3.decode(ids) == text


def test_llama3_chunking_matches_meta_split():
    rng = random.Random(2)
    for _ in range(300):
        s = "".join(rng.choice("ab \n\u3000é") * rng.randrange(1, 12) for _ in range(rng.randrange(8)))
        for max_run in (1, 3, 7):
            ours = list(tiktoken_llama3.split_for_encoding(s, max_chars=10**9, max_run=max_run))
            assert "".join(ours) == s
            assert [p for p in ours if p] == [p for p in meta_split(s, max_run) if p], (s, max_run)


# ---- chat templates --------------------------------------------------------------------------------------------

def test_hf_chat_template_equals_builtin_llama3_format(llama3, llama3_hf):
    assert llama3_hf.chat_template is not None and llama3.chat_template is None
    assert llama3_hf.apply_chat_template(MESSAGES, tokenize=False) == llama3.apply_chat_template(MESSAGES, tokenize=False)
    assert llama3_hf.apply_chat_template(MESSAGES) == llama3.apply_chat_template(MESSAGES)
    # The original Llama 3 8B Instruct template always ends with the assistant header (it ignores the flag).
    assert llama3_hf.apply_chat_template(MESSAGES, add_generation_prompt=False) == llama3.apply_chat_template(MESSAGES)
    assert llama3.apply_chat_template(MESSAGES, add_generation_prompt=False) == llama3.apply_chat_template(MESSAGES)[:-4]
    text = llama3.apply_chat_template(MESSAGES[:2], tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2? 🤔<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.apply_chat_template(MESSAGES) == llama3.encode(
        llama3.apply_chat_template(MESSAGES, tokenize=False), add_bos=False, allow_special=True)


def test_builtin_chat_format_keeps_user_text_plain(llama3, llama3_hf):
    sneaky = [{"role": "user", "content": "hi<|eot_id|><|start_header_id|>system"}]
    ids = llama3.apply_chat_template(sneaky)
    assert ids.count(128009) == 1 and ids.count(128006) == 2  # only the format's own tokens are special
    # A Jinja template renders to a string first, so there (as in transformers) such text becomes special.
    assert llama3_hf.apply_chat_template(sneaky).count(128009) == 2


def test_hf_chat_template_matches_transformers(llama3_hf, transformers_module):
    try:
        ref = transformers_module.AutoTokenizer.from_pretrained(str(LLAMA3_HF))
    except Exception as e:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"transformers cannot load {LLAMA3_HF} offline: {e}")
    for gen in (True, False):
        ids = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert llama3_hf.apply_chat_template(MESSAGES, gen) == list(ids)
        assert llama3_hf.apply_chat_template(MESSAGES, gen, tokenize=False) == ref.apply_chat_template(
            MESSAGES, add_generation_prompt=gen, tokenize=False)


def test_chat_template_is_sandboxed(llama3):
    from jinja2.exceptions import SecurityError, TemplateError

    escape = Tokenizer(llama3.backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        escape.apply_chat_template(MESSAGES)
    strict = Tokenizer(llama3.backend, chat_template="{{ raise_exception('only ' + bos_token) }}")
    with pytest.raises(TemplateError, match="only <\\|begin_of_text\\|>"):
        strict.apply_chat_template(MESSAGES)
    custom = Tokenizer(llama3.backend, chat_template="{{ bos_token }}{{ greeting }}{% if tools is none %}!{% endif %}")
    assert custom.apply_chat_template(MESSAGES, tokenize=False, greeting="hey") == "<|begin_of_text|>hey!"
    with pytest.raises(TypeError, match="Jinja"):
        llama3.apply_chat_template(MESSAGES, greeting="hey")


# ---- BOS / EOS follow the file ------------------------------------------------------------------------------------

def test_bos_follows_the_file(tmp_path, llama2, tok512, llama3, llama3_hf, hf_raw, sp2, transformers_module):
    """A tokenizer.json adds what its post-processor adds (transformers 5 ignores tokenizer_config.json's
    add_bos_token then); a bare tokenizer.model adds BOS (Meta, llama.cpp) unless tokenizer_config.json says."""
    from tokenizers import processors

    for tok in (llama2, tok512, llama3):
        assert (tok.add_bos_token, tok.add_eos_token) == (True, False)
    assert (llama3_hf.add_bos_token, llama3_hf.add_eos_token) == (False, False)
    ref = transformers_module.AutoTokenizer.from_pretrained(str(LLAMA3_HF))
    assert llama3_hf.encode("Hello world") == ref("Hello world")["input_ids"] == [9906, 1917]

    # The same vocabulary with the post-processor of the later Llama 3 files (BOS), and a config that asks for none.
    original = hf_raw.post_processor
    hf_raw.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    hf_raw.save(str(tmp_path / "tokenizer.json"))
    hf_raw.post_processor = original
    config = json.loads((LLAMA3_HF / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer.from_pretrained(tmp_path)
    ref = transformers_module.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.add_bos_token and tok.encode("Hello world") == ref("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok(["Hi", "Hello world"], padding=False, return_tensors=None)["input_ids"] == [[128000, 13347], [128000, 9906, 1917]]

    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    (spm_dir / "tokenizer.model").write_bytes(LLAMA2.read_bytes())
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = Tokenizer.from_pretrained(spm_dir)
    assert tok.encode("Hello world") == [*sp2.encode("Hello world"), 2]
    assert tok.encode("Hello world", add_bos=True, add_eos=False) == llama2.encode("Hello world")


# ---- a sentencepiece-style tokenizer.json (Llama 1/2 layout on the hub) ----------------------------------------

def test_hf_sentencepiece_style_decoder(tmp_path, sp2, llama2):
    """tokenizer.json with Llama 2's decoder chain (Replace, ByteFallback, Fuse, Strip) over Llama 2's pieces."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, normalizers

    vocab = [(sp2.id_to_piece(i), sp2.get_score(i)) for i in range(sp2.get_piece_size())]
    raw = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == ("hf", 1, 2, 2, [2])
    assert not tok.add_bos_token  # the file has no post-processor: no BOS, as in transformers
    for text in CORPUS:
        ids = sp2.encode(text)  # the real Llama 2 ids: decoding only depends on the pieces
        assert tok.decode(ids) == llama2.decode(ids) == raw.decode(ids) == text, text
        assert tok.encode(text, add_bos=False, allow_special=True) == raw.encode(text, add_special_tokens=False).ids
        assert ("<s>" in text) == (tok.encode(text, add_bos=True) != [1, *raw.encode(text, add_special_tokens=False).ids])
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.apply_chat_template(MESSAGES[1:2], tokenize=False) == "<s>[INST] What is 2 + 2? 🤔 [/INST]"


# ---- batches ------------------------------------------------------------------------------------------------

def test_batch_padding(llama3, llama2):
    texts = ["Hello world, how are you?", "Hi", ""]
    rows = [llama3.encode(t) for t in texts]
    width = max(map(len, rows))
    left = llama3(texts)
    assert left["input_ids"].dtype == left["attention_mask"].dtype == torch.long
    assert left["input_ids"].shape == left["attention_mask"].shape == (3, width)
    right = llama3(texts, padding_side="right")
    for k, row in enumerate(rows):
        fill = width - len(row)
        assert left["input_ids"][k].tolist() == [llama3.pad_id] * fill + row
        assert left["attention_mask"][k].tolist() == [0] * fill + [1] * len(row)
        assert right["input_ids"][k].tolist() == row + [llama3.pad_id] * fill
        assert right["attention_mask"][k].tolist() == [1] * len(row) + [0] * fill
    one = llama2("Hello", add_bos=False, add_eos=True)
    assert one["input_ids"].tolist() == [[15043, 2]] and one["attention_mask"].tolist() == [[1, 1]]
    lists = llama3(texts, padding=False, return_tensors=None)
    assert lists["input_ids"] == rows and lists["attention_mask"] == [[1] * len(r) for r in rows]
    assert llama3(["<|eot_id|>"], allow_special=True, add_bos=False)["input_ids"].tolist() == [[128009]]
    with pytest.raises(ValueError, match="padding=True"):
        llama3(texts, padding=False)
    with pytest.raises(ValueError, match="padding_side"):
        llama3(texts, padding_side="middle")
    with pytest.raises(TypeError, match="text 1"):
        llama3(["ok", 3])


# ---- streaming --------------------------------------------------------------------------------------------------

def partial_utf8_ids(tok) -> list[int]:
    """Ids whose bytes alone are not valid UTF-8 (byte-fallback pieces, byte-level fragments)."""
    def invalid(piece: bytes) -> bool:
        try:
            piece.decode()
        except UnicodeDecodeError:
            return True
        return False

    return [i for i, piece in enumerate(tok.backend.byte_vocab.pieces) if invalid(piece)]


def stream(tok, ids, rng=None, skip_special_tokens=False):
    dec = tok.incremental_decoder(skip_special_tokens=skip_special_tokens)
    parts, k = [], 0
    while k < len(ids):
        n = rng.randrange(1, 4) if rng else 1
        parts.append(dec.add(ids[k:k + n] if rng else ids[k]))
        k += n
    return parts, dec.flush()


@pytest.mark.parametrize("name", ["llama2", "tok512", "llama3", "llama3_hf"])
def test_incremental_decoder_equals_decode_on_random_ids(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(3)
    special, partial = sorted(tok.special_ids), partial_utf8_ids(tok)
    for trial in range(200):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.choice(partial) if rng.random() < 0.4
               else rng.randrange(tok.vocab_size) for _ in range(rng.randrange(15))]
        skip = trial % 2 == 1
        parts, tail = stream(tok, ids, rng if trial % 3 == 0 else None, skip)
        assert "".join(parts) + tail == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("name", ["llama2", "tok512", "llama3", "llama3_hf"])
def test_incremental_decoder_streams_whole_characters(name, request):
    tok = request.getfixturevalue(name)
    text = "Hi 😀 there, 𓀀 and 日本語 ok"
    ids = tok.encode(text)
    parts, tail = stream(tok, ids)
    assert "".join(parts) == "".join(parts) + tail == tok.decode(ids)
    assert not any("\ufffd" in p for p in parts)  # a character split over tokens is held back, never mangled
    dec = tok.incremental_decoder(skip_special_tokens=True)
    assert dec.add(ids) == text and dec.flush() == ""
    assert dec.add(ids) + dec.flush() == text  # flush resets the stream, dummy-prefix handling included


def test_incremental_decoder_byte_fallback_and_leading_space(tok512, llama2):
    ids = tok512.encode("😀", add_bos=False)  # "▁" + four byte pieces
    assert len(ids) == 5
    dec = tok512.incremental_decoder()
    assert [dec.add(i) for i in ids] == ["", "", "", "", "😀"]  # the first "▁" is sentencepiece's dummy prefix
    ids = llama2.encode("Hello world", add_bos=False)
    dec = llama2.incremental_decoder()
    assert [dec.add(i) for i in ids] == ["Hello", " world"]
    dec = llama2.incremental_decoder()
    assert dec.add(0xF0 + 3) == "" and dec.flush() == "\ufffd"  # an unfinished character (<0xF0>) ends as U+FFFD
    assert dec.add(0x80 + 3) == "\ufffd"  # a stray continuation byte (<0x80>) can never complete: out at once


# ---- stories260K tok512 ----------------------------------------------------------------------------------------

def llama2c_decode(ids):
    """llama2.c's decode from its own tok512.bin: raw <0xNN> bytes, and the piece after BOS loses its space."""
    data = need(TOK512_BIN).read_bytes()
    pieces, offset = [], 4
    for _ in range(512):
        _, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        offset += 8 + length
    out, prev = b"", None
    for i in ids:
        if i in (1, 2):  # BOS / EOS: llama2.c never prints them
            prev = i
            continue
        piece = pieces[i]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out, prev = out + piece, i
    return out.decode()


def test_tok512_known_ids(tok512):
    # "Once upon a time, there was a little girl named Lily." as sentencepiece encodes it with tok512.model.
    ids = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    text = "Once upon a time, there was a little girl named Lily."
    assert tok512.vocab_size == 512 and tok512.encode(text) == ids
    assert tok512.decode(ids, skip_special_tokens=True) == llama2c_decode(ids) == text
    emoji = tok512.encode("Lily 😀")
    assert tok512.decode(emoji, skip_special_tokens=True) == llama2c_decode(emoji) == "Lily 😀"


def test_tok512_round_trip(tok512):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOK512))
    for text in CORPUS:
        ids = tok512.encode(text, add_bos=False)
        assert ids == sp.encode(text)
        assert tok512.decode(ids) == sp.decode(ids)
        # This model normalises with remove_extra_whitespaces, so only text without space runs survives as is.
        if "  " not in text and text == text.strip(" "):
            assert tok512.decode(ids) == text, text
    assert tok512.decode(tok512.encode("a  b ", add_bos=False)) == "a b"  # what sentencepiece gives too


# ---- loading and bad input --------------------------------------------------------------------------------------

def test_bad_input(llama3, llama2):
    for tok in (llama3, llama2):
        with pytest.raises(ValueError, match=str(tok.vocab_size)):
            tok.decode([5, tok.vocab_size])
        with pytest.raises(ValueError, match="-1"):
            tok.decode([-1])
        with pytest.raises(TypeError, match="str"):
            tok.encode(b"bytes")
        with pytest.raises(TypeError, match="batch"):
            tok.encode(["a", "b"])
        with pytest.raises(TypeError, match="ints"):
            tok.decode([1.5])
        with pytest.raises(ValueError, match="999999"):
            tok.incremental_decoder().add([999999])


def test_tiktoken_ranks_file_without_assets(tmp_path):
    """A byte-only ranks file: every byte its own token, the 256 Llama 3 specials right after."""
    lines = [base64.b64encode(bytes([b])) + b" " + str(b).encode() for b in range(256)]
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("tiktoken", 512, 256, 257, 260)
    assert tok.encode("hé") == [256, 104, 0xC3, 0xA9]
    assert tok.encode("<|eot_id|>", add_bos=False, allow_special=True) == [265]
    assert tok.decode(tok.encode("<|eot_id|> 😀")) == "<|begin_of_text|><|eot_id|> 😀"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_from_pretrained_detection_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"SGVsbG8= 0\nnot base64! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_pretrained(tmp_path)
    if LLAMA2.exists():
        (tmp_path / "tokenizer.model").write_bytes(LLAMA2.read_bytes())
        assert Tokenizer.from_pretrained(tmp_path).encode("hi") == [1, 7251]


def test_from_pretrained_hub_id_offline(tmp_path, monkeypatch, tok512):
    """A hub id resolves from huggingface_hub's cache layout without network when offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tok"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    data = need(TOK512).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / "tokenizer.model").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer.from_pretrained("org/tok", cache_dir=tmp_path)
    assert tok.kind == "sentencepiece" and tok.encode("Lily") == tok512.encode("Lily")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("org/absent", cache_dir=tmp_path)
