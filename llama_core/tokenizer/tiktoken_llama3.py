"""Meta's Llama 3 tokenizer recipe for `tiktoken`: BPE ranks file, split pattern, special tokens, chunking.

Follows `llama_models/llama3/tokenizer.py` (meta-llama/llama-models, the Llama 3.1 / 3.2 text version):
the ranks file carries 128000 ordinary tokens; 256 special tokens are added by code right after them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
# The named specials of Llama 3.1+, in id order from 128000. Llama 3.0 (meta-llama/llama3) named fewer of these
# slots (128004/5 were reserved_2/3, 128008 reserved_4, 128010+ reserved_5..) but the ids of begin/end_of_text,
# start/end_header_id and eot_id are the same in both; the ranks file cannot tell the two apart.
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
)

# tiktoken handles up to 400k characters per call without a pyo3 panic, and Meta additionally cuts runs of more
# than 25k consecutive whitespace or non-whitespace characters: one regex piece must never get that long, or
# BPE on it goes quadratic (openai/tiktoken#195). Same cut points as Meta, so ids match its tokenizer exactly.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Python's `\s` and str.isspace() use the same Unicode table, so these runs are exactly Meta's per-char loop.
_RUNS = re.compile(r"\s+|\S+")
_RANKS_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ \t]+\d+")


def special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Name -> id of the 256 special tokens placed after the `num_base_tokens` ordinary ones."""
    names = list(NAMED_SPECIAL_TOKENS)
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(names))]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def looks_like_ranks_file(path: Path) -> bool:
    """A tiktoken ranks file is text, `base64token rank` per line; a sentencepiece model is a binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline(4096).strip()
    return _RANKS_LINE.fullmatch(first) is not None


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse the ranks file ourselves: tiktoken's loader caches every file it reads in a temp dir keyed by path,
    which would serve stale ranks if the file at that path changed."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path}: line {lineno} is not `base64token rank`: {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the integers 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def build_encoding(path: Path) -> tiktoken.Encoding:
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError(f"{path} is a Llama 3 tiktoken tokenizer; reading it needs `pip install tiktoken`") from e
    ranks = load_ranks(path)
    return tiktoken.Encoding(name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens=special_tokens(len(ranks)))


def split_for_encoding(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """Meta's chunking: `max_chars`-character chunks, each cut wherever a run of whitespace or of non-whitespace
    characters reaches `max_run` characters since the run began (or since the previous cut inside it)."""
    for start in range(0, len(text), max_chars):
        chunk = text[start:start + max_chars]
        cut = 0
        for run in _RUNS.finditer(chunk):
            for pos in range(run.start() + max_run, run.end(), max_run):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


def encode(enc: tiktoken.Encoding, text: str, allow_special: bool) -> list[int]:
    # disallowed_special=(): special-token text is ordinary text unless allowed, never an error (as Meta).
    allowed = "all" if allow_special else set()
    ids: list[int] = []
    for piece in split_for_encoding(text):
        if piece:
            ids.extend(enc.encode(piece, allowed_special=allowed, disallowed_special=()))
    return ids
