"""Token ids -> text through one byte string per token, so that decoding at once and streaming agree exactly.

Every backend (sentencepiece, tiktoken, Hugging Face tokenizers) is reduced to a `ByteVocab`: the bytes each id
stands for, plus sentencepiece's one context rule (the dummy-prefix space of the first token is dropped). A
token can end in the middle of a UTF-8 character (byte-fallback pieces, byte-level BPE), so text is produced
by an incremental UTF-8 decoder that holds back incomplete characters until the next token completes them.
"""

from __future__ import annotations

import codecs
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

# sentencepiece replaces every byte of invalid UTF-8 with U+FFFD; Python's "replace" (like tiktoken and Rust's
# from_utf8_lossy) uses one U+FFFD per maximal invalid subsequence. Both agree on valid text; this handler lets
# the sentencepiece backend match sentencepiece's own decode on arbitrary ids too.
REPLACE_EACH_BYTE = "llama_core.replace_each_byte"


def _replace_each_byte(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error(REPLACE_EACH_BYTE, _replace_each_byte)


@dataclass(frozen=True)
class ByteVocab:
    """How ids become bytes.

    pieces: the bytes of every id (a special token: its text).
    special: ids dropped by `skip_special_tokens`; they never count as "the first token" below.
    dummy_prefix: ids whose leading space is sentencepiece's dummy prefix, dropped when the id is the first
        non-special token (sentencepiece's `add_dummy_prefix`).
    collapse_leading: keep dropping dummy prefixes while nothing has been output yet (sentencepiece's
        `remove_extra_whitespaces`, where a lone "▁" first decodes to nothing).
    errors: the codec error handler for invalid UTF-8.
    """

    pieces: Sequence[bytes]
    special: frozenset[int]
    dummy_prefix: frozenset[int] = field(default_factory=frozenset)
    collapse_leading: bool = False
    errors: str = "replace"


def as_id_list(ids: object, vocab_size: int) -> list[int]:
    """Validate ids (a sequence of ints, a 1-D tensor or array, or one int) before any state changes."""
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()  # type: ignore[union-attr]
    if isinstance(ids, int):
        ids = [ids]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    out: list[int] = []
    for i in ids:
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"token ids must be ints, got {i!r} ({type(i).__name__})") from None
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range for a vocabulary of {vocab_size} (valid: 0..{vocab_size - 1})")
        out.append(i)
    return out


class IncrementalDecoder:
    """Streaming detokenizer: `add(ids)` returns only complete characters, `flush()` ends the stream.

    Concatenating every `add` and the final `flush` gives exactly `Tokenizer.decode` of all the ids, however
    they were split into calls (a 4-byte emoji over four byte-fallback tokens comes out once, whole).
    """

    def __init__(self, vocab: ByteVocab, skip_special_tokens: bool = False):
        self._vocab = vocab
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=vocab.errors)
        self._at_start = True  # no non-special token seen yet (sentencepiece dummy-prefix handling)

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; returns the text they complete (possibly "")."""
        return self._utf8.decode(self._bytes(as_id_list(ids, len(self._vocab.pieces))))

    def flush(self) -> str:
        """End of stream: returns what was held back (an incomplete character becomes U+FFFD) and resets the
        decoder for a new stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._at_start = True
        return text

    def _bytes(self, ids: list[int]) -> bytes:
        v = self._vocab
        out = []
        for i in ids:
            if i in v.special:
                if not self._skip_special:
                    out.append(v.pieces[i])
                continue
            piece = v.pieces[i]
            if self._at_start:
                if i in v.dummy_prefix:
                    piece = piece[1:]
                self._at_start = v.collapse_leading and not piece
            out.append(piece)
        return b"".join(out)


def decode(vocab: ByteVocab, ids: object, skip_special_tokens: bool = False) -> str:
    """All at once: the same code path as streaming, so the two cannot disagree."""
    dec = IncrementalDecoder(vocab, skip_special_tokens)
    return dec.add(as_id_list(ids, len(vocab.pieces))) + dec.flush()


@cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it stands for (HF `ByteLevel`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def byte_piece_value(piece: str) -> int | None:
    """The byte of a sentencepiece byte-fallback piece such as "<0xE2>", else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None
