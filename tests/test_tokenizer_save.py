"""Saving tokenizers: `Tokenizer.save_pretrained(dir)` and `model.save_pretrained(dir, tokenizer=tok)`.

For every tokenizer format in the real assets the saved directory must read back, with our loader and with
transformers' AutoTokenizer, to the same ids (ordinary text, special-token text, non-ASCII, odd spaces) and the
same chat prompt; a model saved with its tokenizer must run `llama-core generate --model dir` as is; a failing
tokenizer write must leave the previous directory untouched.
"""

from __future__ import annotations

import errno

import pytest

from llama_core.cli.main import main
from llama_core.model_io.atomic import NoSpaceLeftError
from llama_core.tokenizer import Tokenizer
from tests.conftest import assets_dir, random_model, small_config

ASSETS = assets_dir()
SOURCES = {
    "llama2_sentencepiece": ASSETS / "llama2-tokenizer" / "tokenizer.model",
    "stories_tok512": ASSETS / "stories260K" / "tok512.model",
    "llama3_tiktoken": ASSETS / "llama3-tiktoken" / "tokenizer.model",
    "llama3_tokenizer_json": ASSETS / "llama3-hf",
    "smollm2_gguf": ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",
}
TEXTS = ["Hello world", " leading  and  double spaces\n\ttab", "Grüße, 日本語 и 🙂", "",
         "a </s> b <s> <|eot_id|> c <|im_start|>user\n<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, ü </s> <|eot_id|>"}]
TOK512 = SOURCES["stories_tok512"]


def _load(name: str) -> Tokenizer:
    if not SOURCES[name].exists():
        pytest.skip(f"{SOURCES[name]} is absent (set LLAMA_CORE_ASSETS)")
    return Tokenizer.from_pretrained(SOURCES[name])


def _same_prompts(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert a.encode(text, allow_special=True) == b.encode(text, allow_special=True), text
        ids = a.encode(text, allow_special=True)
        assert a.decode(ids) == b.decode(ids), text
    assert a.apply_chat_template(MESSAGES, tokenize=False) == b.apply_chat_template(MESSAGES, tokenize=False)
    assert a.apply_chat_template(MESSAGES) == b.apply_chat_template(MESSAGES)
    assert (a.bos_id, a.eos_id, a.pad_id, a.stop_ids, a.vocab_size) == (b.bos_id, b.eos_id, b.pad_id, b.stop_ids,
                                                                         b.vocab_size)


@pytest.mark.parametrize("name", list(SOURCES))
def test_saved_tokenizer_reads_back_in_llama_core_and_transformers(name, tmp_path, transformers_module):
    tok = _load(name)
    files = tok.save_pretrained(tmp_path / "tok")
    assert {f.name for f in files} <= {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                       "special_tokens_map.json"}
    assert not [p.name for p in tmp_path.iterdir() if p.name != "tok"]  # no temporaries or locks left

    _same_prompts(tok, Tokenizer.from_pretrained(tmp_path / "tok"))

    ref = transformers_module.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in TEXTS:
        # transformers parses special-token text by default (our allow_special=True); split_special_tokens=True
        # is our default of special-token text as ordinary text.
        assert ref(text)["input_ids"] == tok.encode(text, allow_special=True), text
        assert ref(text, split_special_tokens=True)["input_ids"] == tok.encode(text), text
    if tok.chat_template is not None:
        assert ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(MESSAGES, tokenize=False)
    else:  # built-in format (Meta's): nothing to write, and transformers gets no template either
        assert ref.chat_template is None


def test_a_resave_removes_tokenizer_files_of_another_format(tmp_path):
    """A tokenizer.json left by an earlier save would win over a new tokenizer.model, and a chat_template.jinja
    over the config's template: the save owns every tokenizer file of the directory."""
    if not TOK512.exists():
        pytest.skip(f"{TOK512} is absent (set LLAMA_CORE_ASSETS)")
    tok = Tokenizer.from_pretrained(TOK512)
    (tmp_path / "chat_template.jinja").write_text("{{ 'stale' }}")
    (tmp_path / "README.md").write_text("mine")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists() and (tmp_path / "README.md").read_text() == "mine"
    assert back.chat_template == tok.chat_template
    assert back.apply_chat_template(MESSAGES, tokenize=False) == "[system] Be brief.\n[user] Hi, ü </s> <|eot_id|>\n"


def _tiny_model(seed: int):
    return random_model(small_config(vocab_size=512, bos_token_id=1, eos_token_id=2), seed=seed)


def test_model_saved_with_its_tokenizer_generates_from_the_cli(tmp_path, capsys):
    if not TOK512.exists():
        pytest.skip(f"{TOK512} is absent (set LLAMA_CORE_ASSETS)")
    tok = Tokenizer.from_pretrained(TOK512)
    out = tmp_path / "model"
    argv = ["generate", "--model", str(out), "--prompt", "Once upon", "--max-new-tokens", "3", "--no-compile"]
    _tiny_model(0).save_pretrained(out)
    assert main(argv) != 0  # weights alone: no tokenizer to read the prompt with
    assert "no tokenizer" in capsys.readouterr().err

    (out / "chat_template.jinja").write_text("{{ 'stale' }}")  # another tokenizer's file, replaced with it
    _tiny_model(0).save_pretrained(out, tokenizer=tok)
    assert not (out / "chat_template.jinja").exists()
    assert main(argv) == 0
    assert "decode: " in capsys.readouterr().err
    _same_prompts(tok, Tokenizer.from_pretrained(out))


def test_failing_tokenizer_write_leaves_the_old_directory(tmp_path, monkeypatch):
    """The tokenizer is written inside the model's directory swap: a full disk while writing it keeps the
    previous weights, config and tokenizer, and leaves no temporary behind."""
    if not TOK512.exists():
        pytest.skip(f"{TOK512} is absent (set LLAMA_CORE_ASSETS)")
    tok = Tokenizer.from_pretrained(TOK512)
    out = tmp_path / "model"
    _tiny_model(0).save_pretrained(out, tokenizer=tok)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Tokenizer, "files_to_save", full_disk)
    with pytest.raises(NoSpaceLeftError, match="no space left on device while writing"):
        _tiny_model(1).save_pretrained(out, tokenizer=tok)  # other weights: a half-done save would show
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_tokenizer_argument_is_checked(tmp_path):
    with pytest.raises(TypeError, match="tokenizer must be a llama_core Tokenizer, got str"):
        _tiny_model(0).save_pretrained(tmp_path / "m", tokenizer="tokenizer.model")
    assert not (tmp_path / "m").exists()
