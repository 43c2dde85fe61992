"""Tokenizers from GGUF metadata, and back: against transformers reading the same GGUF, llama.cpp's own vocabulary
files, our sentencepiece / tokenizer.json / tiktoken tokenizers, and llama.cpp's split regexes run by the `regex`
module (an engine independent of the Oniguruma one inside `tokenizers`).

Tests needing an asset skip when it is absent; everything needs the `gguf` package.
"""

from __future__ import annotations

import base64
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest

from llama_core.tokenizer import Tokenizer, add_tokenizer_metadata, gguf_tokenizer_metadata, save_gguf_vocab
from llama_core.tokenizer.gguf_export import GGUFMetadataValue
from tests.conftest import assets_dir

gguf = pytest.importorskip("gguf")

SMOLLM2 = assets_dir() / "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPM_GGUF = assets_dir() / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"
BPE_GGUF = assets_dir() / "llamacpp-vocab" / "ggml-vocab-llama-bpe.gguf"
LLAMA2 = assets_dir() / "llama2-tokenizer" / "tokenizer.model"
LLAMA3_HF = assets_dir() / "llama3-hf"
LLAMA3_TIKTOKEN = assets_dir() / "llama3-tiktoken" / "tokenizer.model"
TOK512 = assets_dir() / "stories260K" / "tok512.model"

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 2; }  // $x ^ ~y | z",
    "日本語のテキストと中文文本、한국어 텍스트입니다",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵!",
    "runs of spaces:     and\n\n\nnewlines\n\n  \n",
    "\ttabs\tand\t\ttabs\r\nCRLF line\r\n",
    "    four leading spaces",
    "trailing spaces   ",
    " one leading space",
    "numbers 1234567890 3.14159 -42 1e-9 ١٢٣ ½ x  12 345",
    "ünïcödé café naïve Straße ÆØÅ Ελληνικά Русский עברית العربية हिन्दी",
    "I'm can't we'll they'd you're it's HE'S O'Neil",
    "control \x00\x01\x07\x1b[31m chars\x7f zalgo z\u0351\u0352 e\u0301 \u00a0\u2003\u3000",
    "typed by a user: <|im_start|>user\nhi<|im_end|> <|endoftext|> <|eot_id|> <s> </s> [INST] <<SYS>>",
    "",
    " ",
    "\n",
    "  ",
    "a",
    "\u2581x \u2581 y\u2581",
    "x" * 300 + " " * 100 + "y\n" * 20,
]
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2? 🤔"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French, café-style?"},
]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test asset {path} is absent (set LLAMA_CORE_ASSETS)")
    return path


def write_gguf(path: Path, metadata: dict[str, GGUFMetadataValue]) -> Path:
    """A vocabulary-only GGUF through the gguf package's writer, as a GGUF converter would write it."""
    writer = gguf.GGUFWriter(path, "llama")
    add_tokenizer_metadata(writer, metadata)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ids_of(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- fixtures (module-scoped: loading the big vocabularies dominates the run time) ---------------------------------

@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_pretrained(need(SMOLLM2 / SMOLLM2_GGUF).parent)  # a directory with one GGUF in it


@pytest.fixture(scope="module")
def smol_ref():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(need(SMOLLM2 / SMOLLM2_GGUF).parent), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smol_ref_digits(smol_ref):
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json (every digit alone, then
    GPT-2's regex), which is what llama.cpp's "smollm" stands for; transformers' GGUF loader knows no "smollm"
    and splits with GPT-2's regex only."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    raw = RawTokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return raw


@pytest.fixture(scope="module")
def spm_gguf():
    return Tokenizer.from_pretrained(need(SPM_GGUF))


@pytest.fixture(scope="module")
def bpe_gguf():
    return Tokenizer.from_pretrained(need(BPE_GGUF))


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer.from_pretrained(need(LLAMA2))


@pytest.fixture(scope="module")
def llama3_hf():
    return Tokenizer.from_pretrained(need(LLAMA3_HF / "tokenizer.json").parent)


@pytest.fixture(scope="module")
def tok512():
    return Tokenizer.from_pretrained(need(TOK512))


@pytest.fixture(scope="module")
def tiny_ranks(tmp_path_factory) -> Path:
    """A small Llama 3 style tiktoken ranks file: the 256 bytes, then tokens each made of two earlier ones."""
    tokens = [bytes([b]) for b in range(256)]
    for word in ("he", "ll", "hell", "hello", " w", "or", " wor", "ld", " world", "  ", "    ", "\n\n", "é", "12"):
        raw = word.encode()
        assert any(raw[:k] in tokens and raw[k:] in tokens for k in range(1, len(raw))), word
        tokens.append(raw)
    directory = tmp_path_factory.mktemp("tiny-tiktoken")
    lines = [base64.b64encode(t) + b" " + str(i).encode() for i, t in enumerate(tokens)]
    (directory / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    return directory


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_ranks, tmp_path_factory) -> Tokenizer:
    """The tiny ranks as a "gpt2" GGUF vocabulary."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    return Tokenizer.from_pretrained(write_gguf(path, gguf_tokenizer_metadata(Tokenizer.from_pretrained(tiny_ranks))))


# ---- SmolLM2 against transformers ----------------------------------------------------------------------------------

def spaces_before_digit(text: str) -> bool:
    """Two or more whitespace characters, then a digit."""
    return any(a.isspace() and b.isspace() and unicodedata.category(c).startswith("N")
               for a, b, c in zip(text, text[1:], text[2:], strict=False))


def test_smollm2_ids_match_transformers(smol, smol_ref, smol_ref_digits):
    assert (smol.kind, smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id, smol.stop_ids) == ("gguf", 49152, 1, 2, 2, [2])
    assert not smol.add_bos_token and not smol.add_eos_token  # the file's add_bos_token = false; transformers agrees
    differ = []
    for text in TEXTS:
        ours = smol.encode(text, allow_special=True)
        smol_ref_digits.encode_special_tokens = False
        assert ours == smol_ref_digits.encode(text).ids, text
        # by default special-token text typed by a user stays text (transformers' split_special_tokens)
        smol_ref_digits.encode_special_tokens = True
        assert smol.encode(text) == smol_ref_digits.encode(text).ids, text
        if ours != ids_of(smol_ref(text)):
            differ.append(text)
    # transformers' own GGUF loader differs exactly where whitespace runs into a digit: llama.cpp (and SmolLM2's
    # tokenizer.json) split "  1" as "  ", "1"; GPT-2's regex alone as " ", " 1". There it is not the reference.
    assert differ == [t for t in TEXTS if spaces_before_digit(t)] and len(differ) == 1
    assert smol.encode("<|im_start|>", allow_special=True) == [1] and len(smol.encode("<|im_start|>")) > 1


def test_smollm2_gpt2_pre_tokenizer_matches_transformers(smol, smol_ref, tmp_path):
    """The same vocabulary named with llama.cpp's "gpt-2" pre-tokenizer is what transformers builds from it."""
    metadata = gguf_tokenizer_metadata(smol)
    metadata["tokenizer.ggml.pre"] = GGUFMetadataValue("gpt-2", "STRING")
    gpt2 = Tokenizer.from_pretrained(write_gguf(tmp_path / "gpt-2.gguf", metadata))
    for text in TEXTS:
        assert gpt2.encode(text, allow_special=True) == ids_of(smol_ref(text)), text


def test_smollm2_decode_round_trips(smol, smol_ref):
    for text in TEXTS:
        ids = smol.encode(text, allow_special=True)
        assert smol.decode(ids) == text == smol_ref.decode(ids), text
        assert smol.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True), text
    ids = smol.apply_chat_template(MESSAGES)
    assert smol.decode(ids) == smol.apply_chat_template(MESSAGES, tokenize=False)
    dec = smol.incremental_decoder()
    assert "".join(dec.add(i) for i in ids) + dec.flush() == smol.decode(ids)


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:3]], ids=["system", "no-system"])
def test_smollm2_chat_template_matches_transformers(smol, smol_ref, messages):
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template
    for gen in (True, False):
        assert smol.apply_chat_template(messages, gen) == ids_of(
            smol_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)), gen
        assert smol.apply_chat_template(messages, gen, tokenize=False) == smol_ref.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False)


# ---- llama.cpp's vocabulary files against our tokenizers -------------------------------------------------------------

def test_llamacpp_spm_vocab_equals_llama2(spm_gguf, llama2):
    attrs = ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "special_ids", "add_bos_token", "add_eos_token")
    assert [getattr(spm_gguf, a) for a in attrs] == [getattr(llama2, a) for a in attrs]
    assert spm_gguf.add_bos_token  # llama.cpp's default for a sentencepiece vocabulary, and Meta's
    for text in TEXTS:
        ids = llama2.encode(text)
        assert spm_gguf.encode(text) == ids, text
        assert spm_gguf.encode(text, allow_special=True) == llama2.encode(text, allow_special=True), text
        assert spm_gguf.decode(ids) == llama2.decode(ids), text
        assert spm_gguf.decode(ids[1:]) == text.replace("\u2581", " "), text  # a typed "▁" is a space to sentencepiece
    assert spm_gguf.apply_chat_template(MESSAGES) == llama2.apply_chat_template(MESSAGES)  # built-in [INST] format


def test_llamacpp_bpe_vocab_equals_llama3(bpe_gguf, llama3_hf):
    attrs = ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "special_ids")
    assert [getattr(bpe_gguf, a) for a in attrs] == [getattr(llama3_hf, a) for a in attrs]
    # The GGUF has no add_bos_token; llama.cpp adds BOS for "llama-bpe". The tokenizer.json adds none (as
    # transformers reads it).
    assert bpe_gguf.add_bos_token and not llama3_hf.add_bos_token
    for text in TEXTS:
        ids = llama3_hf.encode(text, add_bos=True)
        assert bpe_gguf.encode(text) == ids, text
        assert bpe_gguf.encode(text, allow_special=True) == llama3_hf.encode(text, add_bos=True, allow_special=True)
        assert bpe_gguf.decode(ids) == llama3_hf.decode(ids) == "<|begin_of_text|>" + text, text
    assert bpe_gguf.chat_template is None  # the vocab file carries none: Meta's built-in Llama 3 format
    assert bpe_gguf.apply_chat_template(MESSAGES) == llama3_hf.apply_chat_template(MESSAGES)


def test_metadata_is_what_llama_cpp_writes(spm_gguf, bpe_gguf, llama2, llama3_hf):
    """Our metadata of Meta's files equals llama.cpp's conversion of them (its models/ggml-vocab-*.gguf)."""
    assert gguf_tokenizer_metadata(llama2) == gguf_tokenizer_metadata(spm_gguf)
    ours, theirs = gguf_tokenizer_metadata(llama3_hf), gguf_tokenizer_metadata(bpe_gguf)
    assert {k: v for k, v in ours.items() if k != "tokenizer.chat_template"} == {
        **theirs, "tokenizer.ggml.add_bos_token": GGUFMetadataValue(False, "BOOL")}
    assert ours["tokenizer.ggml.merges"].value[:3] == ["Ġ Ġ", "Ġ ĠĠĠ", "ĠĠ ĠĠ"]


def test_tiktoken_metadata(bpe_gguf, tiny_ranks, tiny_gpt2):
    """Meta's ranks file gives llama.cpp's Llama 3 vocabulary: the same merges, tokens and types; only the names
    of reserved special tokens differ (Llama 3.1's in Meta's recipe, Llama 3.0's in the GGUF)."""
    ours = gguf_tokenizer_metadata(Tokenizer.from_pretrained(need(LLAMA3_TIKTOKEN).parent))
    theirs = gguf_tokenizer_metadata(bpe_gguf)
    for key in ("model", "pre", "merges", "token_type", "bos_token_id", "eos_token_id"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.ggml.tokens"].value[:128000] == theirs["tokenizer.ggml.tokens"].value[:128000]
    assert ours["tokenizer.ggml.padding_token_id"].value == 128004  # <|finetune_right_pad_id|>
    tiny = Tokenizer.from_pretrained(tiny_ranks)
    assert tiny_gpt2.add_bos_token and (tiny_gpt2.bos_id, tiny_gpt2.pad_id) == (tiny.bos_id, tiny.pad_id)
    for text in [*TEXTS, "hello world  hello\n\n\n12 héllo", "<|eot_id|><|begin_of_text|>"]:
        for special in (False, True):
            assert tiny_gpt2.encode(text, allow_special=special) == tiny.encode(text, allow_special=special), text


# ---- round trips: Tokenizer -> metadata -> GGUF (gguf.GGUFWriter) -> Tokenizer -------------------------------------

@pytest.mark.parametrize("name", ["llama2", "llama3_hf", "tok512", "smol"])
def test_round_trip(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    back = Tokenizer.from_pretrained(write_gguf(tmp_path / f"{name}.gguf", gguf_tokenizer_metadata(tok)))
    attrs = ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "special_ids", "add_bos_token",
             "add_eos_token", "chat_template")
    assert back.kind == "gguf" and [getattr(back, a) for a in attrs] == [getattr(tok, a) for a in attrs]
    for text in TEXTS:
        ids = tok.encode(text)
        assert back.encode(text) == ids, text
        assert back.encode(text, allow_special=True) == tok.encode(text, allow_special=True), text
        assert back.decode(ids) == tok.decode(ids), text
    assert back.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    assert gguf_tokenizer_metadata(back) == gguf_tokenizer_metadata(tok)


def test_sentencepiece_style_tokenizer_json_exports(spm_gguf, llama2, tmp_path):
    """A tokenizer.json in Llama 2's HF layout (BPE + byte fallback, "▁" normalizer) becomes a "llama" vocabulary
    whose scores come from the merge order."""
    spm_gguf.backend.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    hf = Tokenizer.from_pretrained(tmp_path)
    assert hf.kind == "hf" and not hf.add_bos_token  # no post-processor in that file
    back = Tokenizer.from_pretrained(save_gguf_vocab(hf, tmp_path / "out" / "llama2.gguf"))
    assert back.special_ids == llama2.special_ids and back.backend.vocab.token_types[:4] == [2, 3, 3, 6]
    for text in TEXTS:
        for special in (False, True):
            assert back.encode(text, allow_special=special) == llama2.encode(text, add_bos=False, allow_special=special)


@pytest.mark.parametrize("name", ["smol", "spm_gguf"])
def test_hf_files_from_gguf(name, request, tmp_path, transformers_module):
    """GGUF -> tokenizer.json + tokenizer_config.json (a GGUF -> HF conversion): transformers and we read them
    back as the GGUF tokenizer, BOS and chat template included."""
    from llama_core.tokenizer.gguf_vocab import save_hf_tokenizer_files

    tok = request.getfixturevalue(name)
    files = save_hf_tokenizer_files(tok.name_or_path if name == "spm_gguf" else SMOLLM2 / SMOLLM2_GGUF, tmp_path)
    assert [f.name for f in files] == ["tokenizer.json", "tokenizer_config.json"]
    hf, ref = Tokenizer.from_pretrained(tmp_path), transformers_module.AutoTokenizer.from_pretrained(str(tmp_path))
    attrs = ("bos_id", "eos_id", "pad_id", "stop_ids", "special_ids", "add_bos_token", "add_eos_token", "chat_template")
    assert hf.kind == "hf" and [getattr(hf, a) for a in attrs] == [getattr(tok, a) for a in attrs]
    for text in TEXTS:
        ids = tok.encode(text, allow_special=True)
        assert hf.encode(text, allow_special=True) == ids == ids_of(ref(text)), text
        assert hf.encode(text) == tok.encode(text), text
    if tok.chat_template is not None:
        assert hf.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES) == ids_of(
            ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))


# ---- the pre-tokenizers split as llama.cpp does ------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's llm_tokenizer_bpe regexes (llama-vocab.cpp), applied in turn.
LLAMA_CPP_SPLITS = {
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
}


def llama_cpp_split(text: str, patterns: list[str]) -> list[str]:
    """unicode_regex_split: each regex cuts every piece into its matches and the stretches between them."""
    regex = pytest.importorskip("regex")
    pieces = [text]
    for pattern in patterns:
        compiled, out = regex.compile(pattern), []
        for piece in pieces:
            start = 0
            for m in compiled.finditer(piece):
                out += [piece[start:m.start()]] if m.start() > start else []
                out += [m.group()] if m.end() > m.start() else []
                start = m.end()
            out += [piece[start:]] if start < len(piece) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_SPLITS))
def test_pre_tokenizers_split_as_llama_cpp(pre, tiny_gpt2, tmp_path):
    metadata = gguf_tokenizer_metadata(tiny_gpt2)
    metadata["tokenizer.ggml.pre"] = GGUFMetadataValue(pre, "STRING")
    tok = Tokenizer.from_pretrained(write_gguf(tmp_path / "v.gguf", metadata))
    rng = random.Random(0)
    texts = [*TEXTS, *("".join(rng.choice(" \n\t\r.,!?'sdl$+<=>^~|-1234567890aZé日😀١") for _ in range(rng.randrange(30)))
                       for _ in range(300))]
    for text in texts:
        pieces = [text[a:b] for _, (a, b) in tok.backend.tk.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == llama_cpp_split(text, LLAMA_CPP_SPLITS[pre]), text
    assert tok.encode("hello world", add_bos=False) == tiny_gpt2.encode("hello world", add_bos=False)


def test_control_and_user_defined_tokens(tiny_gpt2, tmp_path):
    """Token types decide what is matched whole: control tokens only where special text is allowed (and they are
    special ids), user-defined ones always (as llama.cpp and transformers' added tokens)."""
    metadata = gguf_tokenizer_metadata(tiny_gpt2)
    hello, world = (tiny_gpt2.token_to_id(t) for t in ("hello", "Ġworld"))
    types = list(metadata["tokenizer.ggml.token_type"].value)
    types[hello], types[world] = 4, 3  # USER_DEFINED, CONTROL
    metadata["tokenizer.ggml.token_type"] = GGUFMetadataValue(types, "ARRAY", "INT32")
    tok = Tokenizer.from_pretrained(write_gguf(tmp_path / "types.gguf", metadata))
    ids = tok.encode("xhelloy Ġworld", add_bos=False)  # a control token's text, typed, stays text
    assert hello in ids and world not in ids and tok.decode(ids) == "xhelloy Ġworld"
    assert world in tok.encode("xhelloy Ġworld", add_bos=False, allow_special=True)
    assert tok.is_special(world) and not tok.is_special(hello)
    assert tok.decode([world, hello], skip_special_tokens=True) == "hello"


# ---- loading: path forms and bad input -------------------------------------------------------------------------------

def test_from_pretrained_path_forms(smol, tok512, tmp_path):
    assert smol.name_or_path == str(SMOLLM2)  # the fixture loads the asset directory holding one GGUF
    one = tmp_path / "one"
    save_gguf_vocab(tok512, one / "tok512.gguf")
    text = "Lily 😀 <s>"
    for tok in (Tokenizer.from_pretrained(one / "tok512.gguf"), Tokenizer.from_pretrained(one),
                Tokenizer.from_pretrained(one, gguf_file="tok512.gguf"), Tokenizer.from_gguf(one / "tok512.gguf")):
        assert tok.kind == "gguf" and tok.encode(text) == tok512.encode(text)
    metadata = gguf_tokenizer_metadata(tok512)
    metadata["tokenizer.chat_template"] = GGUFMetadataValue("{{ bos_token }}{{ messages[0]['content'] }}", "STRING")
    write_gguf(one / "chat.gguf", metadata)
    with pytest.raises(ValueError, match=r"several GGUF files \(chat\.gguf, tok512\.gguf\).*gguf_file="):
        Tokenizer.from_pretrained(one)
    chat = Tokenizer.from_pretrained(one, gguf_file="chat.gguf")
    assert chat.apply_chat_template([{"role": "user", "content": "Lily"}], tokenize=False) == "<s>Lily"
    assert chat.apply_chat_template([{"role": "user", "content": "Lily"}]) == tok512.encode("Lily")
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf"):
        Tokenizer.from_pretrained(one, gguf_file="absent.gguf")
    with pytest.raises(ValueError, match="inside"):
        Tokenizer.from_pretrained(one, gguf_file="../one/chat.gguf")
    with pytest.raises(ValueError, match="is a file"):
        Tokenizer.from_pretrained(one / "chat.gguf", gguf_file="chat.gguf")
    (one / "tokenizer.model").write_bytes(TOK512.read_bytes())  # tokenizer files beside GGUFs win, as before
    assert Tokenizer.from_pretrained(one).kind == "sentencepiece"


def test_bad_input(tmp_path, tok512, tiny_gpt2):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"junk\.gguf is not a GGUF file"):
        Tokenizer.from_pretrained(junk)
    spm, bpe = gguf_tokenizer_metadata(tok512), gguf_tokenizer_metadata(tiny_gpt2)
    cases = {  # name: (base metadata, change, what the error must say)
        "no-tokens": (spm, {"tokenizer.ggml.tokens": None}, "'tokenizer.ggml.tokens' is missing"),
        "no-model": (spm, {"tokenizer.ggml.model": None}, "'tokenizer.ggml.model' is missing"),
        "bert": (spm, {"tokenizer.ggml.model": GGUFMetadataValue("bert", "STRING")}, "'bert'.*'gpt2'.*'llama'"),
        "no-scores": (spm, {"tokenizer.ggml.scores": None}, "'tokenizer.ggml.scores' is missing"),
        "no-merges": (bpe, {"tokenizer.ggml.merges": None}, "'tokenizer.ggml.merges' is missing"),
        "pre": (bpe, {"tokenizer.ggml.pre": GGUFMetadataValue("mystery", "STRING")},
                "'mystery'.*known: .*default.*llama-bpe.*smollm"),
        "types": (spm, {"tokenizer.ggml.token_type": GGUFMetadataValue([1, 1], "ARRAY", "INT32")}, "token_type"),
        "bos": (spm, {"tokenizer.ggml.bos_token_id": GGUFMetadataValue(99999, "UINT32")}, "bos_token_id.*99999"),
    }
    for name, (base, change, message) in cases.items():
        metadata = {k: v for k, v in {**base, **change}.items() if v is not None}
        path = write_gguf(tmp_path / f"{name}.gguf", metadata)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            Tokenizer.from_pretrained(path)


def test_unsupported_tokenizers_have_no_gguf_form(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models

    raw = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    raw.decoder = decoders.Metaspace()
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="only plain BPE"):
        gguf_tokenizer_metadata(Tokenizer.from_pretrained(tmp_path))
