"""A `Tokenizer` as GGUF metadata: the `tokenizer.ggml.*` keys (and `tokenizer.chat_template`) that llama.cpp and
`gguf_vocab.py` read back, for writing with the `gguf` package's `GGUFWriter`.

    metadata = gguf_tokenizer_metadata(tok)        # key -> GGUFMetadataValue(value, vtype, sub_type)
    add_tokenizer_metadata(writer, metadata)        # writer.add_key_value(...) for each, e.g. in write_gguf's
                                                    # add_metadata callback
    save_gguf_vocab(tok, "vocab.gguf")              # or a vocabulary-only GGUF in one call

What each tokenizer becomes, as llama.cpp's own converter writes it:
- sentencepiece `tokenizer.model` (Llama 2, llama2.c): model "llama" with pieces, scores and piece types read
  from the model file, the dummy prefix and sentencepiece's whitespace cleanup flag;
- Llama 3 tiktoken ranks: model "gpt2", pre "llama-bpe", tokens spelled in GPT-2's byte alphabet, and as merges
  every split of a token into two tokens, by the rank of the result (what Llama 3's tokenizer.json lists);
- tokenizer.json: byte-level BPE with a pre-tokenizer llama.cpp names (Llama 3, GPT-2, SmolLM) -> "gpt2";
  sentencepiece-style BPE (Llama 2 layout) -> "llama", scores recovered from the merge order;
- a tokenizer read from a GGUF: its own vocabulary again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..model_io.atomic import atomic_file
from ..model_io.gguf_file import import_gguf
from . import tiktoken_llama3
from .backends import HFBackend, SentencePieceBackend, TiktokenBackend
from .detokenize import byte_level_alphabet, byte_piece_value
from .gguf_vocab import (
    BYTE,
    CONTROL,
    GPT2_SPLIT,
    NORMAL,
    PRE_TOKENIZERS,
    UNKNOWN,
    USER_DEFINED,
    GGUFBackend,
    GGUFVocab,
)

# A llama_core Tokenizer. Not imported, even for type checkers: tokenizer.py imports this module to save
# tiktoken and GGUF vocabularies as tokenizer.json, and the two must not import each other.
Tokenizer = Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFMetadataValue:
    """A metadata value and its GGUF types, as `gguf.GGUFWriter.add_key_value(key, value, vtype, sub_type)` takes
    them: `vtype` and `sub_type` name members of `gguf.GGUFValueType` ("STRING", "UINT32", "INT32", "FLOAT32",
    "BOOL", "ARRAY"); `sub_type` is the element type of an ARRAY, else None."""

    value: Any
    vtype: str
    sub_type: str | None = None


def gguf_tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, GGUFMetadataValue]:
    """The GGUF metadata of `tokenizer` (key -> value with its GGUF type), in the order llama.cpp writes it."""
    v = gguf_vocab_of(tokenizer)
    out = {"tokenizer.ggml.model": GGUFMetadataValue(v.model, "STRING"),
           "tokenizer.ggml.pre": GGUFMetadataValue(v.pre or "default", "STRING"),
           "tokenizer.ggml.tokens": GGUFMetadataValue(list(v.tokens), "ARRAY", "STRING")}
    if v.scores is not None:
        out["tokenizer.ggml.scores"] = GGUFMetadataValue(list(v.scores), "ARRAY", "FLOAT32")
    out["tokenizer.ggml.token_type"] = GGUFMetadataValue(list(v.token_types), "ARRAY", "INT32")
    if v.merges is not None:
        out["tokenizer.ggml.merges"] = GGUFMetadataValue(list(v.merges), "ARRAY", "STRING")
    for key, i in (("bos_token_id", v.bos_id), ("eos_token_id", v.eos_id), ("unknown_token_id", v.unk_id),
                   ("padding_token_id", v.pad_id), ("eot_token_id", v.eot_id), ("eom_token_id", v.eom_id)):
        if i is not None:
            out[f"tokenizer.ggml.{key}"] = GGUFMetadataValue(i, "UINT32")
    out["tokenizer.ggml.add_bos_token"] = GGUFMetadataValue(v.add_bos, "BOOL")
    out["tokenizer.ggml.add_eos_token"] = GGUFMetadataValue(v.add_eos, "BOOL")
    if v.model == "llama":
        out["tokenizer.ggml.add_space_prefix"] = GGUFMetadataValue(v.add_space_prefix, "BOOL")
        out["tokenizer.ggml.remove_extra_whitespaces"] = GGUFMetadataValue(v.remove_extra_whitespaces, "BOOL")
    if v.chat_template is not None:
        out["tokenizer.chat_template"] = GGUFMetadataValue(v.chat_template, "STRING")
    return out


def add_tokenizer_metadata(writer: Any, metadata: Tokenizer | Mapping[str, GGUFMetadataValue]) -> None:
    """Add a tokenizer's metadata (or `gguf_tokenizer_metadata`'s result) to a `gguf.GGUFWriter`."""
    gguf = import_gguf()
    items = metadata if isinstance(metadata, Mapping) else gguf_tokenizer_metadata(metadata)
    for key, v in items.items():
        writer.add_key_value(key, v.value, gguf.GGUFValueType[v.vtype],
                             sub_type=gguf.GGUFValueType[v.sub_type] if v.sub_type else None)


def save_gguf_vocab(tokenizer: Tokenizer, path: str | os.PathLike, architecture: str = "llama") -> Path:
    """Write a vocabulary-only GGUF (no tensors), as llama.cpp's models/ggml-vocab-*.gguf; atomically."""
    gguf = import_gguf()
    metadata = gguf_tokenizer_metadata(tokenizer)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        add_tokenizer_metadata(writer, metadata)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def gguf_vocab_of(tokenizer: Tokenizer) -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer`; a ValueError when its kind cannot be written as one."""
    b = tokenizer.backend
    if isinstance(b, GGUFBackend):
        v = b.vocab
    elif isinstance(b, SentencePieceBackend):
        v = _from_sentencepiece(b, tokenizer.name_or_path)
    elif isinstance(b, TiktokenBackend):
        v = _from_tiktoken(b, tokenizer.name_or_path)
    elif isinstance(b, HFBackend):
        v = _from_tokenizer_json(b, tokenizer.name_or_path)
    else:
        raise ValueError(f"{tokenizer!r}: no GGUF form for a {type(b).__name__}")
    return dataclasses.replace(v, add_bos=b.add_bos, add_eos=b.add_eos, chat_template=tokenizer.chat_template)


def _ids(b: Any, source: str, **fields: Any) -> GGUFVocab:
    """A vocabulary with the backend's special ids (pad only where the tokenizer has a real pad token)."""
    base: dict[str, Any] = dict(source=source, scores=None, merges=None, pre=None, bos_id=b.bos_id, eos_id=b.eos_id,
                                unk_id=None, pad_id=None, eot_id=None, eom_id=None, add_bos=b.add_bos,
                                add_eos=b.add_eos, add_space_prefix=False, remove_extra_whitespaces=False,
                                chat_template=None)
    return GGUFVocab(**{**base, **fields})


# ---- sentencepiece ---------------------------------------------------------------------------------------------

def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message, in wire order: varints as ints, fixed32 / fixed64 / length-
    delimited fields as bytes. Enough to read a sentencepiece model without depending on protobuf."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _from_sentencepiece(b: SentencePieceBackend, source: str) -> GGUFVocab:
    proto = b.sp.serialized_model_proto()
    tokens, scores, types = [], [], []
    normalizer: dict[int, Any] = {}
    model_type = 1  # UNIGRAM, the proto default
    for field, value in _proto_fields(proto):
        if field == 1:  # ModelProto.pieces: SentencePiece {piece = 1, score = 2, type = 3 (default NORMAL)}
            piece = dict(_proto_fields(value))
            tokens.append(piece.get(1, b"").decode())
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(piece.get(3, NORMAL))
        elif field == 2:  # TrainerSpec.model_type = 3
            model_type = dict(_proto_fields(value)).get(3, model_type)
        elif field == 3:  # NormalizerSpec
            normalizer = dict(_proto_fields(value))
    if model_type != 2:
        raise ValueError(f"{source}: a sentencepiece {'unigram' if model_type == 1 else 'non-BPE'} model; GGUF's "
                         f"'llama' vocabulary (and llama.cpp) tokenize as BPE")
    if normalizer.get(2):  # precompiled_charsmap: llama.cpp's SPM tokenizer applies no normalization rules
        raise ValueError(f"{source}: the sentencepiece model normalizes text "
                         f"({normalizer.get(1, b'?').decode()}), which a GGUF 'llama' vocabulary cannot express")
    return _ids(b, source, model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                unk_id=b.sp.unk_id() if b.sp.unk_id() >= 0 else None,
                pad_id=b.sp.pad_id() if b.sp.pad_id() >= 0 else None,
                add_space_prefix=bool(normalizer.get(3, 1)), remove_extra_whitespaces=bool(normalizer.get(4, 1)))


# ---- byte-level BPE (tiktoken ranks, tokenizer.json) -----------------------------------------------------------

@cache
def _byte_level_table() -> dict[int, str]:
    """latin-1 character -> its stand-in in GPT-2's byte alphabet, for str.translate."""
    return {b: c for c, b in byte_level_alphabet().items()}


def _byte_level(token: bytes) -> str:
    return token.decode("latin-1").translate(_byte_level_table())


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """tiktoken's BPE as merges: every split of a token into two tokens, ordered by the rank of the result (then
    of the halves). tiktoken merges the adjacent pair whose concatenation ranks best; with these merges BPE makes
    the same choice, and a piece that is a whole token is taken as is (ignore_merges, as tiktoken)."""
    found = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _from_tiktoken(b: TiktokenBackend, source: str) -> GGUFVocab:
    n_base = b.vocab_size - tiktoken_llama3.NUM_SPECIAL_TOKENS
    ranks = {b.enc.decode_single_token_bytes(i): i for i in range(n_base)}
    names = {i: t for t, i in b.special_tokens.items()}
    tokens = [*(_byte_level(t) for t in ranks), *(names[i] for i in range(n_base, b.vocab_size))]
    spelled = dict(zip(ranks, tokens, strict=False))
    merges = [f"{spelled[left]} {spelled[right]}" for left, right in merges_from_ranks(ranks)]
    s = b.special_tokens
    return _ids(b, source, model="gpt2", pre="llama-bpe", tokens=tokens, merges=merges,
                token_types=[NORMAL] * n_base + [CONTROL] * (b.vocab_size - n_base), pad_id=b.pad_id,
                eot_id=s.get("<|eot_id|>"), eom_id=s.get("<|eom_id|>"))


def _pre_splits(spec: Any) -> tuple[str, ...] | None:
    """The split regexes of a byte-level tokenizer.json pre-tokenizer, in llama.cpp's terms, or None."""
    steps = spec.get("pretokenizers", []) if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    if not steps or not isinstance(steps[-1], dict) or steps[-1].get("type") != "ByteLevel" \
            or steps[-1].get("add_prefix_space"):
        return None
    splits: list[str] = []
    for s in steps[:-1]:
        if s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert") \
                and "Regex" in s.get("pattern", {}):
            splits.append(s["pattern"]["Regex"])
        elif s.get("type") == "Digits" and s.get("individual_digits"):
            splits.append(r"\p{N}")  # Rust's char::is_numeric is \p{N}
        else:
            return None
    return (*splits, GPT2_SPLIT) if steps[-1].get("use_regex", True) else tuple(splits)


def _from_tokenizer_json(b: HFBackend, source: str) -> GGUFVocab:
    spec = json.loads(b.tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ValueError(f"{source}: only plain BPE tokenizer.json models have a GGUF form, not {model.get('type')}")
    tokens: list[str | None] = [None] * b.vocab_size
    for t, i in model["vocab"].items():
        tokens[i] = t
    added = {t["id"]: t for t in spec["added_tokens"]}
    for i, t in added.items():
        tokens[i] = t["content"]
    if None in tokens:
        raise ValueError(f"{source}: token id {tokens.index(None)} is unused; GGUF needs every id 0..{b.vocab_size - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [NORMAL if i not in added else CONTROL if added[i]["special"] else USER_DEFINED for i in range(len(tokens))]
    if b._style == "byte_level":
        splits = _pre_splits(spec.get("pre_tokenizer"))
        ignore = bool(model.get("ignore_merges"))
        pre = next((name for name in ("llama-bpe", "smaug-bpe", "gpt-2", "smollm", "default")
                    if PRE_TOKENIZERS[name].splits == splits and PRE_TOKENIZERS[name].ignore_merges == ignore), None)
        if pre is None or spec.get("normalizer") is not None:
            raise ValueError(f"{source}: its normalizer / pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))}, "
                             f"ignore_merges={ignore}) is none of llama.cpp's that llama_core knows")
        return _ids(b, source, model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges,
                    pad_id=b.pad_id if b.pad_id != b.eos_id else None)
    return _from_sentencepiece_json(b, source, spec, tokens, types, merges)  # type: ignore[arg-type]


def _from_sentencepiece_json(b: HFBackend, source: str, spec: dict[str, Any], tokens: list[str], types: list[int],
                             merges: list[str]) -> GGUFVocab:
    """A sentencepiece-style tokenizer.json (Llama 2's HF layout). Its BPE lists merges best first, so a piece's
    score is minus the position of the first merge that forms it; pieces no merge forms keep sentencepiece's 0."""
    normalizer = spec.get("normalizer") or {}
    normalizers = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    pre = spec.get("pre_tokenizer") or {}
    prefix = any(n.get("type") == "Prepend" for n in normalizers) or (
        pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never")
    if pre.get("type") == "Metaspace":
        logger.warning("%s: a Metaspace pre-tokenizer adds no second dummy space before text that starts with one; "
                       "the GGUF vocabulary does, as sentencepiece and llama.cpp", source)
    scores = [0.0] * len(tokens)
    seen: set[str] = set()
    for k, m in enumerate(merges):
        piece = m.replace(" ", "", 1)
        if piece not in seen:
            seen.add(piece)
            scores[model_id] = -float(k) if (model_id := b.tk.token_to_id(piece)) is not None else 0.0
    unk = spec["model"].get("unk_token")
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and byte_piece_value(t) is not None:
            types[i] = BYTE
        elif types[i] == NORMAL and t == unk:
            types[i] = UNKNOWN
        elif types[i] == NORMAL and t not in seen and len(t) > 1:
            scores[i] = -float(len(merges) + i)  # never formed from text by a merge: below every merged piece
    return _ids(b, source, model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                unk_id=b.tk.token_to_id(unk) if unk else None, pad_id=b.pad_id if b.pad_id != b.eos_id else None,
                add_space_prefix=prefix)
