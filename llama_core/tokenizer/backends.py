"""The three tokenizer file formats Llama models ship with, each behind the same small interface.

- `SentencePieceBackend`: `tokenizer.model` of Llama 1/2 (and llama2.c models), via `sentencepiece`.
- `TiktokenBackend`: `tokenizer.model` of Llama 3 (BPE ranks), via `tiktoken` with Meta's exact setup.
- `HFBackend`: `tokenizer.json` of Hugging Face repos, via `tokenizers`.

A backend encodes text without BOS/EOS (the `Tokenizer` adds those) and describes its ids as a `ByteVocab` for
decoding. Ids, names of special tokens and the BOS/EOS/pad choices live here; everything shared lives in
`tokenizer.py`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from . import tiktoken_llama3
from .detokenize import REPLACE_EACH_BYTE, ByteVocab, byte_level_alphabet, byte_piece_value

_SPACE_MARK = "▁"  # sentencepiece's stand-in for a space
# Stop tokens of the Llama 3 chat models besides EOS: end of turn, end of message (before a tool call).
_LLAMA3_STOP_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def import_tokenizers(path: str | Path) -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"{path} is a Hugging Face-style tokenizer; reading it needs `pip install tokenizers`") from e
    return tokenizers


# tokenizers' Oniguruma regex pre-tokenizers (Llama 3, SmolLM2) panic once one match needs more retries than the
# engine allows, which a whitespace run of some millions of characters does; the panic is pyo3's PanicException,
# a BaseException that `except Exception` misses. Runs longer than this are cut every this many characters from
# the run's start before the text reaches the library. BPE on a run of one repeated character produces blocks
# of a power-of-two length (128 spaces, 32 newlines, 16 tabs in Llama 3; 64 spaces in SmolLM2): cutting at a
# multiple of them, away from the run's end, gives the library's own ids (tested). Ordinary text never has such
# runs and is not cut.
MAX_WHITESPACE_RUN = 1 << 16
_LONG_WHITESPACE = re.compile(rf"\s{{{MAX_WHITESPACE_RUN + 1},}}")


def cut_long_whitespace(text: str, max_run: int = MAX_WHITESPACE_RUN) -> list[str]:
    """`text` in pieces whose whitespace runs have at most 2 * `max_run` characters each (`text` alone if none)."""
    if len(text) <= max_run:
        return [text]
    pattern = _LONG_WHITESPACE if max_run == MAX_WHITESPACE_RUN else re.compile(rf"\s{{{max_run + 1},}}")
    pieces, cut = [], 0
    for run in pattern.finditer(text):
        # Cuts leave more than max_run characters of the run after them: BPE treats the last block of a run
        # together with its remainder, so the uncut tail keeps the library's ids.
        for pos in range(run.start() + max_run, run.end() - max_run, max_run):
            pieces.append(text[cut:pos])
            cut = pos
    pieces.append(text[cut:])
    return pieces


def check_unicode(text: str, what: str = "text") -> None:
    """Every backend refuses text that is not valid Unicode (lone surrogates such as "\\ud800", which only
    arise from broken decoding) with the same error, instead of each library's own raw one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: lone surrogate {text[e.start]!r} at position {e.start} "
                         "(from errors='surrogateescape' decoding or broken UTF-16; decode with errors='replace')") from None


def _dedupe(ids: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class Backend:
    """What `Tokenizer` needs from a file format. Subclasses set every attribute in `__init__`."""

    kind: str
    vocab_size: int
    special_tokens: dict[str, int]  # text -> id of every special token
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_ids: tuple[int, ...]
    # Whether the file asks for BOS / EOS around encoded text (transformers' add_bos_token / add_eos_token);
    # `Tokenizer.encode` follows these unless told otherwise.
    add_bos: bool = False
    add_eos: bool = False

    def encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], allow_special: bool) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @cached_property
    def byte_vocab(self) -> ByteVocab:
        raise NotImplementedError


class SentencePieceBackend(Backend):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"{path} is a sentencepiece tokenizer; reading it needs `pip install sentencepiece`") from e
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from e
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        # Control pieces (<s>, </s>) never come out of text; unk is a placeholder for text and decodes to " ⁇ ".
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        # Llama 2 defines no pad piece (pad_id -1); EOS is what Meta and most fine-tuning code pad with, and
        # padded positions are masked out by attention_mask anyway.
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = _dedupe([self.eos_id])
        # The model file says nothing about BOS; Meta's generation code, HF Llama 2 repos (add_bos_token) and
        # llama.cpp all add it. tokenizer_config.json's add_bos_token / add_eos_token override (Tokenizer).
        self.add_bos = self.bos_id is not None
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if not (allow_special and self._special_re):
            return self.sp.encode(text)
        # sentencepiece itself never parses special tokens out of text: split on them first. Each text segment
        # gets its own dummy prefix, as in Meta's Llama 2 chat encoding (one encode call per turn).
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool) -> list[list[int]]:
        if allow_special:
            return super().encode_batch(texts, allow_special)
        return self.sp.encode(list(texts))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk: check the round trip
        return i if self.sp.id_to_piece(i) == token else None

    @cached_property
    def byte_vocab(self) -> ByteVocab:
        sp = self.sp
        pieces: list[bytes] = []
        dummy_prefix: set[int] = set()
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            byte = byte_piece_value(piece) if sp.is_byte(i) else None
            if byte is not None:
                pieces.append(bytes([byte]))
            elif sp.is_unknown(i):
                pieces.append(sp.decode([i]).encode())  # the unk surface, " ⁇ " unless the model sets another
            elif sp.is_control(i):
                pieces.append(piece.encode())
            else:
                pieces.append(piece.replace(_SPACE_MARK, " ").encode())
                if piece.startswith(_SPACE_MARK):
                    dummy_prefix.add(i)
        # Whether decode drops the first token's leading space (add_dummy_prefix or remove_extra_whitespaces)
        # and whether a lone "▁" first keeps that going (remove_extra_whitespaces): asked of sentencepiece
        # itself rather than parsed from the model proto, which would need protobuf.
        probe = next((i for i in sorted(dummy_prefix) if len(sp.id_to_piece(i)) > 1), None)
        strips = probe is not None and sp.decode([probe]) == pieces[probe][1:].decode()
        space = self.token_to_id(_SPACE_MARK)
        collapse = strips and space is not None and probe is not None and sp.decode([space, probe]) == sp.decode([probe])
        return ByteVocab(pieces, frozenset(self.special_tokens.values()),
                         frozenset(dummy_prefix) if strips else frozenset(), collapse, REPLACE_EACH_BYTE)


class TiktokenBackend(Backend):
    kind = "tiktoken"

    def __init__(self, path: Path):
        self.enc = tiktoken_llama3.build_encoding(path)
        self.vocab_size = self.enc.n_vocab
        self.special_tokens = tiktoken_llama3.special_tokens(self.vocab_size - tiktoken_llama3.NUM_SPECIAL_TOKENS)
        s = self.special_tokens
        self.bos_id, self.eos_id = s["<|begin_of_text|>"], s["<|end_of_text|>"]
        self.pad_id = s["<|finetune_right_pad_id|>"]  # Meta's own pad id for Llama 3.1+
        self.stop_ids = _dedupe([s[name] for name in _LLAMA3_STOP_NAMES])
        self.add_bos = True  # Meta's recipe starts every prompt with <|begin_of_text|>

    def encode(self, text: str, allow_special: bool) -> list[int]:
        return tiktoken_llama3.encode(self.enc, text, allow_special)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None

    @cached_property
    def byte_vocab(self) -> ByteVocab:
        pieces = [self.enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        return ByteVocab(pieces, frozenset(self.special_tokens.values()))


def _decoder_specs(spec: Any) -> list[dict[str, Any]]:
    """Every decoder in a tokenizer.json decoder spec, flattened (Sequence decoders nest)."""
    if isinstance(spec, list):
        return [d for item in spec for d in _decoder_specs(item)]
    if isinstance(spec, dict):
        return [spec, *_decoder_specs(spec.get("decoders", []))]
    return []


def _pre_tokenizer_specs(spec: Any) -> list[dict[str, Any]]:
    """Every pre-tokenizer in a tokenizer.json pre-tokenizer spec (Sequence pre-tokenizers nest)."""
    if isinstance(spec, dict):
        return [spec, *(p for s in spec.get("pretokenizers", []) for p in _pre_tokenizer_specs(s))]
    return []


def _post_processor_specs(spec: Any) -> list[dict[str, Any]]:
    """Every post-processor in a tokenizer.json post-processor spec, in order (Sequence processors nest)."""
    if isinstance(spec, dict):
        return [spec] if spec.get("type") != "Sequence" else [p for s in spec.get("processors", [])
                                                               for p in _post_processor_specs(s)]
    return []


def added_around_text(tk: Any) -> tuple[list[int], list[int]]:
    """Ids of the special tokens a tokenizer.json post-processor puts before and after a single text (its
    TemplateProcessing `single`, or Bert/Roberta's cls/sep): what transformers adds with add_special_tokens."""
    before: list[int] = []
    after: list[int] = []
    spec = json.loads(tk.post_processor.__getstate__()) if tk.post_processor is not None else None
    for p in _post_processor_specs(spec):
        if p.get("type") == "TemplateProcessing":
            seen_text = False
            for piece in p.get("single", []):
                if "Sequence" in piece:
                    seen_text = True
                elif "SpecialToken" in piece:
                    name = piece["SpecialToken"]["id"]
                    (after if seen_text else before).extend(p.get("special_tokens", {}).get(name, {}).get("ids", []))
        elif p.get("type") in ("BertProcessing", "RobertaProcessing"):
            before.append(p["cls"][1])
            after.append(p["sep"][1])
    return before, after


class HFBackend(Backend):
    kind = "hf"

    def __init__(self, path: Path, config: dict[str, Any]):
        tokenizers = import_tokenizers(path)
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from e
        self._setup(tk, path)

        def lookup(*names: Any) -> int | None:
            for name in names:
                name = name.get("content") if isinstance(name, dict) else name  # old configs store AddedToken dicts
                if isinstance(name, str) and tk.token_to_id(name) is not None:
                    return tk.token_to_id(name)
            return None

        # BOS/EOS as the file's post-processor adds them. transformers (5.x) does the same and ignores
        # tokenizer_config.json's add_bos_token/add_eos_token whenever a tokenizer.json is present. A file whose
        # config names no BOS/EOS still says which token its post-processor adds.
        before, after = added_around_text(tk)
        self.bos_id = lookup(config.get("bos_token"), "<|begin_of_text|>", "<s>")
        self.bos_id = before[0] if self.bos_id is None and len(before) == 1 else self.bos_id
        self.eos_id = lookup(config.get("eos_token"), "<|end_of_text|>", "</s>")
        self.eos_id = after[0] if self.eos_id is None and len(after) == 1 else self.eos_id
        self.add_bos = self._flag(before, self.bos_id, "BOS", path)
        self.add_eos = self._flag(after, self.eos_id, "EOS", path)
        # No pad token in Llama tokenizers: Meta's <|finetune_right_pad_id|> where it exists, else EOS.
        self.pad_id = lookup(config.get("pad_token"), "<|finetune_right_pad_id|>")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.stop_ids = _dedupe([self.eos_id, *(self.special_tokens.get(n) for n in _LLAMA3_STOP_NAMES)])

    @staticmethod
    def _flag(added: list[int], expected: int | None, what: str, path: Path) -> bool:
        if not added:
            return False
        if added == [expected]:
            return True
        raise ValueError(f"{path}: the post-processor adds ids {added} around the text where llama_core expects "
                         f"only the {what} token (id {expected}); this layout is not supported")

    def _setup(self, tk: Any, source: str | Path) -> None:
        """What every tokenizers-based backend shares: the tokenizer, its added tokens and decoder style."""
        self.tk = tk
        # Padding or truncation saved in tokenizer.json would silently change ids; batching is done here.
        tk.no_padding()
        tk.no_truncation()
        added = tk.get_added_tokens_decoder()
        self._added_text = {i: t.content for i, t in added.items()}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = max([*tk.get_vocab(with_added_tokens=False).values(), *added]) + 1
        self._lock = threading.Lock()  # encode_special_tokens is tokenizer-wide state, toggled per call
        # Only regex pre-tokenizers panic on long runs; sentencepiece-style files (no pre-tokenizer, or
        # Metaspace) see the whole text as one piece, where a cut would add a dummy-prefix space.
        pre = json.loads(tk.pre_tokenizer.__getstate__()) if tk.pre_tokenizer is not None else None
        self._regex_split = any(p.get("type") == "Split" or (p.get("type") == "ByteLevel" and p.get("use_regex", True))
                                for p in _pre_tokenizer_specs(pre))

        specs = _decoder_specs(json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else None)
        types = {d.get("type") for d in specs}
        if "ByteLevel" in types:
            self._style = "byte_level"  # Llama 3, GPT-2 style
        elif types & {"ByteFallback", "Metaspace", "Replace"}:
            self._style = "sentencepiece"  # Llama 1/2, Mistral: "▁" for spaces, <0xNN> byte pieces
        else:
            raise ValueError(f"{source}: unsupported decoder {sorted(map(str, types)) or None}; llama_core decodes "
                             f"byte-level BPE (Llama 3) and sentencepiece-style (Llama 1/2) tokenizer.json files")
        # Whether decoding drops the first token's dummy-prefix space: Llama 2 files end their decoder chain with
        # Strip(" ", 1, 0); Metaspace decoders do it unless prepend_scheme is "never".
        self._strips_prefix = self._style == "sentencepiece" and any(
            d.get("type") == "Strip" or (d.get("type") == "Metaspace" and d.get("prepend_scheme") != "never"
                                         and d.get("add_prefix_space", True)) for d in specs)

    def encode(self, text: str, allow_special: bool) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool) -> list[list[int]]:
        # add_special_tokens=False: BOS/EOS are the Tokenizer's job (some tokenizer.json post-processors add BOS,
        # others do not); encode_special_tokens=True is transformers' split_special_tokens.
        pieces = [cut_long_whitespace(t) if self._regex_split else [t] for t in texts]
        with self._lock:
            self.tk.encode_special_tokens = not allow_special
            encoded = self.tk.encode_batch([p for ps in pieces for p in ps], add_special_tokens=False)
        rows, k = [], 0
        for ps in pieces:  # pieces of one text back into one row
            rows.append([i for e in encoded[k:k + len(ps)] for i in e.ids])
            k += len(ps)
        return rows

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    @cached_property
    def byte_vocab(self) -> ByteVocab:
        tokens = [self.tk.id_to_token(i) or "" for i in range(self.vocab_size)]
        dummy_prefix: set[int] = set()
        if self._style == "byte_level":
            alphabet = byte_level_alphabet()
            chars = frozenset(alphabet)
            to_latin1 = str.maketrans({c: chr(b) for c, b in alphabet.items()})

            def to_bytes(token: str) -> bytes:
                if chars.issuperset(token):
                    return token.translate(to_latin1).encode("latin-1")  # each stand-in char -> its byte
                return token.encode()  # as HF's ByteLevel decoder: a token outside the alphabet is plain text
        else:

            def to_bytes(token: str) -> bytes:
                byte = byte_piece_value(token)
                return bytes([byte]) if byte is not None else token.replace(_SPACE_MARK, " ").encode()

        pieces = []
        for i, token in enumerate(tokens):
            if i in self._added_text:  # added tokens are stored as the text they stand for
                pieces.append(self._added_text[i].encode())
                continue
            pieces.append(to_bytes(token))
            if self._strips_prefix and token.startswith(_SPACE_MARK):
                dummy_prefix.add(i)
        errors = REPLACE_EACH_BYTE if self._style == "sentencepiece" else "replace"
        return ByteVocab(pieces, frozenset(self.special_tokens.values()), frozenset(dummy_prefix), False, errors)
