"""Tokenizers from a GGUF file's metadata: llama.cpp's `tokenizer.ggml.*` keys and `tokenizer.chat_template`.

A GGUF carries no tokenizer.json, only the vocabulary as llama.cpp uses it. Two kinds of vocabulary are read:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (Llama 3, SmolLM2): tokens, merges and a pre-tokenizer named
  by `tokenizer.ggml.pre`. The name stands for the split regexes in llama.cpp's `llm_tokenizer_bpe` (see
  `PRE_TOKENIZERS`); they become `tokenizers` Split pre-tokenizers applied in the same order.
- `tokenizer.ggml.model == "llama"`: a sentencepiece BPE vocabulary (Llama 1/2): pieces with scores and types,
  `<0xNN>` byte pieces for byte fallback, `add_space_prefix`. Sentencepiece (and llama.cpp's SPM tokenizer)
  repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece; with merges listed in
  that order `tokenizers`' BPE makes the same choices, and a normalizer adds the dummy prefix and "▁" for spaces.

Either way the result is a `tokenizers.Tokenizer` behind the same `HFBackend` code as a tokenizer.json, with ids,
special tokens and BOS/EOS taken from the GGUF. `gguf_export.py` goes the other way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..model_io.gguf_file import GGUFFile
from . import tiktoken_llama3
from .backends import _LLAMA3_STOP_NAMES, _SPACE_MARK, HFBackend, _dedupe, import_tokenizers
from .detokenize import REPLACE_EACH_BYTE, ByteVocab, byte_level_alphabet, byte_piece_value

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType), one per token in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODELS = ("gpt2", "llama")

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = tiktoken_llama3.PAT_STR  # the regex of Llama 3's tokenizer.json and of Meta's tiktoken recipe


@dataclass(frozen=True)
class PreTokenizer:
    """One of llama.cpp's byte-level pre-tokenizers: regexes splitting text in turn (every match and every
    stretch between matches becomes a piece, as llama.cpp's unicode_regex_split), plus the flags llama.cpp
    sets for it: `ignore_merges` (a piece that is a whole token is not merged from bytes) and whether BOS is
    added when the file has no add_bos_token."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_GPT2 = PreTokenizer((GPT2_SPLIT,))
_SMOLLM = PreTokenizer((r"\p{N}", GPT2_SPLIT))  # every digit alone (SmolLM2's tokenizer.json: Digits)
# llama.cpp's fallback for a missing `pre` (and for "gpt2", which it does not know): punctuation runs first,
# then GPT-2's regex, then digit runs, then groups of three ASCII digits.
_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"))
# tokenizer.ggml.pre -> its pre-tokenizer; the names llama.cpp (llama-vocab.cpp) maps to these four regex sets.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
                    _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizer((LLAMA3_SPLIT,))),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _SMOLLM),
    **dict.fromkeys(["default", "gpt2"], _DEFAULT),
}


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF file's tokenizer metadata, checked. Ids are None where the file names none."""

    source: str
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None  # "llama" only
    merges: list[str] | None  # "gpt2" only, "left right" as llama.cpp stores them
    pre: str | None  # "gpt2" only
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    chat_template: str | None


def read_gguf_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The tokenizer metadata of the GGUF file `path`; a ValueError naming the file and the key when a key is
    missing or malformed, or the vocabulary is of a kind llama_core does not read."""
    return _read(GGUFFile(path), str(path))


def _read(f: GGUFFile, source: str) -> GGUFVocab:
    def strings(key: str, required: bool = True) -> list[str] | None:
        value = f.get(key) if required else f.get(key, None)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{source}: metadata key {key!r} must be an array of strings")
        return value

    model = f.get("tokenizer.ggml.model")
    if model not in MODELS:
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; llama_core reads 'gpt2' (byte-level BPE) "
                         f"and 'llama' (sentencepiece BPE) vocabularies")
    tokens = strings("tokenizer.ggml.tokens")
    assert tokens is not None
    if not tokens:
        raise ValueError(f"{source}: metadata key 'tokenizer.ggml.tokens' is empty")
    n = len(tokens)
    types = f.get("tokenizer.ggml.token_type", None)
    types = [NORMAL] * n if types is None else types  # llama.cpp's default when a file has no types
    if len(types) != n or not all(isinstance(t, int) for t in types):
        raise ValueError(f"{source}: metadata key 'tokenizer.ggml.token_type' must be {n} integers (one per token)")
    scores = merges = pre = None
    if model == "llama":
        scores = f.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != n or not all(isinstance(x, (int, float)) for x in scores):
            raise ValueError(f"{source}: metadata key 'tokenizer.ggml.scores' must be {n} numbers (one per token)")
        scores = [float(s) for s in scores]
    else:
        merges = strings("tokenizer.ggml.merges")
        pre = f.get("tokenizer.ggml.pre", None)
        if pre is None:
            logger.warning("%s has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", source)
            pre = "default"
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer llama_core does not know; "
                             f"known: {', '.join(sorted(PRE_TOKENIZERS))}")

    def token_id(key: str, default: int | None = None) -> int | None:
        value = f.get(f"tokenizer.ggml.{key}", default)
        if value is not None and (not isinstance(value, int) or not 0 <= value < n):
            raise ValueError(f"{source}: metadata key 'tokenizer.ggml.{key}' is {value!r}, not a token id below {n}")
        return value

    def flag(key: str, default: bool) -> bool:
        value = f.get(f"tokenizer.ggml.{key}", default)
        if not isinstance(value, bool):
            raise ValueError(f"{source}: metadata key 'tokenizer.ggml.{key}' must be a bool, got {value!r}")
        return value

    spm = model == "llama"
    # Defaults as llama.cpp's llama_vocab::load: sentencepiece vocabularies have <unk> <s> </s> at 0, 1, 2, a
    # dummy prefix and BOS; byte-level ones add BOS only for some pre-tokenizers (Llama 3's).
    bos = token_id("bos_token_id", 1 if spm and n > 2 else None)
    template = f.get("tokenizer.chat_template", None)
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source}: metadata key 'tokenizer.chat_template' must be a string")
    return GGUFVocab(
        source=source, model=model, tokens=tokens, token_types=types, scores=scores, merges=merges, pre=pre,
        bos_id=bos, eos_id=token_id("eos_token_id", 2 if spm and n > 2 else None),
        unk_id=token_id("unknown_token_id", 0 if spm else None), pad_id=token_id("padding_token_id"),
        eot_id=token_id("eot_token_id"), eom_id=token_id("eom_token_id"),
        add_bos=flag("add_bos_token", True if spm else PRE_TOKENIZERS[str(pre)].add_bos),
        add_eos=flag("add_eos_token", False), add_space_prefix=flag("add_space_prefix", spm),
        remove_extra_whitespaces=flag("remove_extra_whitespaces", False), chat_template=template)


# ---- vocabulary -> tokenizer.json ------------------------------------------------------------------------------

def _added_tokens(v: GGUFVocab) -> list[dict[str, Any]]:
    """Control tokens as special added tokens; user-defined ones as plain added tokens, which llama.cpp (and
    transformers) also match whole in any text. Both are matched in the raw text, before normalization."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": kind == CONTROL}
            for i, (t, kind) in enumerate(zip(v.tokens, v.token_types, strict=True)) if kind in (CONTROL, USER_DEFINED)]


def _bpe(vocab: dict[str, int], merges: list[list[str]], **options: Any) -> dict[str, Any]:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            **options, "vocab": vocab, "merges": merges}


def byte_level_json(v: GGUFVocab) -> dict[str, Any]:
    """tokenizer.json of a "gpt2" vocabulary."""
    assert v.merges is not None and v.pre is not None
    vocab = {t: i for i, t in enumerate(v.tokens)}  # a repeated token resolves to its last id, as in llama.cpp
    merges = []
    for m in v.merges:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        left, right = m[:cut], m[cut + 1:]
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            merges.append([left, right])
    if len(merges) < len(v.merges):
        logger.warning("%s: %d merges name tokens outside the vocabulary; they are ignored", v.source,
                       len(v.merges) - len(merges))
    pre = PRE_TOKENIZERS[v.pre]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in pre.splits]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(v),
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                *splits, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": _bpe(vocab, merges, ignore_merges=pre.ignore_merges)}


def merges_by_score(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """Sentencepiece BPE as merges: every split of a normal piece into two normal pieces, best-scoring result
    first (equal scores in file order). Only normal pieces are ever formed from text: control, unknown and byte
    pieces are not, and user-defined ones are matched whole beforehand."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            if piece[:k] in normal and piece[k:] in normal:
                found.append((-scores[i], i, k))
    found.sort()
    return [[tokens[i][:k], tokens[i][k:]] for _, i, k in found]


def sentencepiece_json(v: GGUFVocab) -> dict[str, Any]:
    """tokenizer.json of a "llama" vocabulary, encoding as sentencepiece does."""
    assert v.scores is not None
    steps: list[dict[str, Any]] = []
    if v.remove_extra_whitespaces:  # sentencepiece's normalizer: no leading spaces, runs of spaces become one
        # \A and \z: tokenizers' regexes are Oniguruma's, where ^ and $ match at every line break.
        steps += [{"type": "Replace", "pattern": {"Regex": r"\A +"}, "content": ""},
                  {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if v.add_space_prefix:  # the dummy prefix: per stretch of text between special tokens, never on ""
        steps.append({"type": "Prepend", "prepend": _SPACE_MARK})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": _SPACE_MARK})
    if v.remove_extra_whitespaces:  # ... and every trailing "▁" goes, typed ones and the dummy prefix included
        steps.append({"type": "Replace", "pattern": {"Regex": _SPACE_MARK + r"+\z"}, "content": ""})
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": _SPACE_MARK}, "content": " "},
                                      {"type": "ByteFallback"}, {"type": "Fuse"}]
    if v.add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = v.tokens[v.unk_id] if v.unk_id is not None else None
    model = _bpe({t: i for i, t in enumerate(v.tokens)}, merges_by_score(v.tokens, v.scores, v.token_types),
                 unk_token=unk, fuse_unk=True, byte_fallback=BYTE in v.token_types)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(v),
            "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
            "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


class GGUFBackend(HFBackend):
    """A GGUF vocabulary through `tokenizers`; ids, special tokens and BOS/EOS as the file states them."""

    kind = "gguf"

    def __init__(self, vocab: GGUFVocab):
        tokenizers = import_tokenizers(vocab.source)
        spec = sentencepiece_json(vocab) if vocab.model == "llama" else byte_level_json(vocab)
        try:
            tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # tokenizers raises a bare Exception on an inconsistent vocabulary
            raise ValueError(f"{vocab.source}: the tokenizer metadata does not make a valid tokenizer: {e}") from e
        self._setup(tk, vocab.source)
        self.vocab = vocab
        self.vocab_size = len(vocab.tokens)
        self.special_tokens = {}
        for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True)):
            if kind == CONTROL:
                self.special_tokens.setdefault(t, i)
        self.bos_id, self.eos_id = vocab.bos_id, vocab.eos_id
        pad = vocab.pad_id if vocab.pad_id is not None else self.special_tokens.get("<|finetune_right_pad_id|>")
        self.pad_id = pad if pad is not None else self.eos_id  # as HFBackend: Meta's pad token, else EOS
        self.stop_ids = _dedupe([self.eos_id, vocab.eot_id, vocab.eom_id,
                                 *(self.special_tokens.get(n) for n in _LLAMA3_STOP_NAMES)])
        self.add_bos, self.add_eos = vocab.add_bos, vocab.add_eos

    @cached_property
    def byte_vocab(self) -> ByteVocab:
        v = self.vocab
        special = frozenset(i for i, kind in enumerate(v.token_types) if kind == CONTROL)
        pieces: list[bytes] = []
        if v.model == "gpt2":
            alphabet = byte_level_alphabet()
            for t, kind in zip(v.tokens, v.token_types, strict=True):
                if kind in (NORMAL, UNUSED, UNKNOWN) and all(c in alphabet for c in t):
                    pieces.append(bytes(alphabet[c] for c in t))
                else:  # control and user-defined tokens (and stray unspelled ones) stand for their text
                    pieces.append(t.encode())
            return ByteVocab(pieces, special)
        dummy_prefix = set()
        for i, (t, kind) in enumerate(zip(v.tokens, v.token_types, strict=True)):
            byte = byte_piece_value(t) if kind == BYTE else None
            if byte is not None:
                pieces.append(bytes([byte]))
            elif kind == UNKNOWN:
                pieces.append(" \u2047 ".encode())  # what sentencepiece prints for <unk>
            elif kind == CONTROL:
                pieces.append(t.encode())
            else:
                pieces.append(t.replace(_SPACE_MARK, " ").encode())
                if v.add_space_prefix and t.startswith(_SPACE_MARK):
                    dummy_prefix.add(i)
        return ByteVocab(pieces, special, frozenset(dummy_prefix), v.remove_extra_whitespaces, REPLACE_EACH_BYTE)


def load_gguf_backend(path: str | os.PathLike) -> tuple[GGUFBackend, str | None]:
    """The backend and chat template of the GGUF file `path`."""
    vocab = read_gguf_vocab(Path(path))
    return GGUFBackend(vocab), vocab.chat_template


def save_hf_tokenizer_files(gguf_path: str | os.PathLike, directory: str | os.PathLike) -> list[Path]:
    """Write the GGUF file's tokenizer as `tokenizer.json` + `tokenizer_config.json` in `directory` (for a GGUF ->
    HF conversion); transformers and `Tokenizer.from_pretrained` read them back with the GGUF's ids, BOS/EOS and
    chat template. Returns the two paths."""
    vocab = read_gguf_vocab(Path(gguf_path))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in hf_tokenizer_files(vocab).items():
        (out / name).write_bytes(data)
        written.append(out / name)
    return written


def hf_tokenizer_files(vocab: GGUFVocab) -> dict[str, bytes]:
    """File name -> content of `vocab` as Hugging Face files: `tokenizer.json` (BOS/EOS in its post-processor)
    and `tokenizer_config.json` (special tokens, chat template). Built in memory so that callers choose how to
    write them (atomically one by one, or inside a directory swap)."""
    from tokenizers import processors

    v, tk = vocab, GGUFBackend(vocab).tk  # a fresh tokenizer: setting its post-processor touches no live one
    added = [(what, i) for what, i, on in (("BOS", v.bos_id, v.add_bos), ("EOS", v.eos_id, v.add_eos)) if on]
    if added:  # BOS / EOS go in the post-processor: with a tokenizer.json, transformers (5.x) looks only there
        if any(i is None for _, i in added):
            raise ValueError(f"{v.source}: add_bos_token / add_eos_token is set, but the file names no such token")
        bos = [v.tokens[i] for what, i in added if what == "BOS"]  # type: ignore[index]
        eos = [v.tokens[i] for what, i in added if what == "EOS"]  # type: ignore[index]
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=[(v.tokens[i], i) for _, i in added])  # type: ignore[index]
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "add_bos_token": v.add_bos, "add_eos_token": v.add_eos}
    for key, i in (("bos_token", v.bos_id), ("eos_token", v.eos_id), ("unk_token", v.unk_id), ("pad_token", v.pad_id)):
        if i is not None:
            config[key] = v.tokens[i]
    if v.chat_template is not None:
        config["chat_template"] = v.chat_template
    return {"tokenizer.json": tk.to_str(pretty=True).encode(),
            "tokenizer_config.json": json_bytes(config)}


def json_bytes(obj: Any) -> bytes:
    """JSON as transformers writes its config files (indented, UTF-8 kept readable)."""
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode()
