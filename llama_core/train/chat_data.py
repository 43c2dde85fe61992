"""Chat fine-tuning data: JSONL conversations -> token stream whose loss is on assistant turns only.

Each line of a ``.jsonl`` file is ``{"messages": [{"role": "system" | "user" | "assistant" | ..., "content":
"..."}, ...]}``. A conversation is rendered with the tokenizer's own chat template (``apply_chat_template``:
the model's Jinja template, or the built-in Llama 3 / Llama 2 format) and becomes one document of the packed
stream (``data.TokenStream``), so packing, document masking and exact resume work as for text.

Which tokens are trained is found from the template itself, without knowing its markup: for the k-th message,
an assistant turn, the conversation up to it rendered with the generation prompt (exactly the prompt the model
sees at inference) is a prefix of the conversation rendered through it; the tokens in between are the reply as
the model must generate it, up to and including its first end-of-turn stop token (trained, so the model learns
to stop), and nothing after it (a template's newline after the stop token is never generated). The prompt must
be a token prefix of the whole conversation, and the reply must follow it there; a template for which that
fails (one that rewrites earlier turns depending on later ones) is refused with the conversation's line, not
silently mislabelled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import Tokenizer
from .data import TEXT_SUFFIXES, TokenStream, list_files, read_text

logger = logging.getLogger(__name__)

CHAT_SUFFIXES = (".jsonl",)
TRAINED_ROLE = "assistant"


def resolve_data_format(path: str | os.PathLike, data_format: str) -> str:
    """``"text"`` or ``"chat"``. ``"auto"``: chat for a ``.jsonl`` file, or a directory holding ``.jsonl`` files and
    no text files; text otherwise."""
    if data_format != "auto":
        return data_format
    root = Path(path)
    if root.is_file():
        return "chat" if root.suffix.lower() in CHAT_SUFFIXES else "text"
    if root.is_dir():
        suffixes = {p.suffix.lower() for p in root.rglob("*") if p.is_file()}
        if suffixes & set(CHAT_SUFFIXES) and not suffixes & set(TEXT_SUFFIXES):
            return "chat"
    return "text"


def read_conversations(file: Path) -> list[tuple[str, list[dict[str, str]]]]:
    """``(where, messages)`` of each conversation of one JSONL file, each checked; errors name the file and
    line (``where`` is "FILE line N", for later errors)."""
    raw, text = read_text(file)
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        conversations.append((where, check_conversation(record, where)))
    if not conversations:
        raise ValueError(f"{file} is empty" if not raw else f"{file} holds no conversations")
    return conversations


def check_conversation(record: Any, where: str) -> list[dict[str, str]]:
    """``{"messages": [...]}`` with string roles and contents and at least one assistant turn."""
    messages = record.get("messages") if isinstance(record, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} with at least '
                         f"one message, got {_preview(record)}")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {k} must have a string 'role' and a string 'content', got "
                             f"{_preview(m)}")
    if not any(m["role"] == TRAINED_ROLE for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message, so nothing in it would be trained")
    return [dict(m) for m in messages]


def _preview(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def conversation_tokens(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer,
                        where: str = "conversation") -> tuple[list[int], list[bool]]:
    """``(ids, trained)``: the whole conversation's ids and, per id, whether it belongs to an assistant reply
    (see the module docstring)."""
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    trained = [False] * len(ids)
    stops = set(tokenizer.stop_ids)
    for k, m in enumerate(messages):
        if m["role"] != TRAINED_ROLE:
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        through = _render(tokenizer, messages[:k + 1], add_generation_prompt=False)
        start, end = len(prompt), _common_prefix(through, ids)
        if ids[:start] != prompt or end <= start:
            raise ValueError(f"{where}: the chat template does not render assistant message {k} as a continuation of "
                             f"the prompt before it, so its tokens cannot be located; use a template whose earlier "
                             f"turns do not depend on later ones")
        # The reply ends at its first stop token (trained: the model learns to stop); a template's text after
        # it (a newline, or Meta's template's always-appended assistant header) is never generated.
        end = next((i + 1 for i in range(start, end) if ids[i] in stops), end)
        trained[start:end] = [True] * (end - start)
    return ids, trained


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt))


def load_chat_stream(path: str | os.PathLike, tokenizer: Tokenizer) -> TokenStream:
    """All conversations under ``path`` as one stream of documents, ``trainable`` set on assistant tokens."""
    tokens: list[int] = []
    doc_ids: list[int] = []
    trainable: list[bool] = []
    files = list_files(path, CHAT_SUFFIXES, "chat")
    count = 0
    for file in files:
        for where, messages in read_conversations(file):
            ids, trained = conversation_tokens(messages, tokenizer, where)
            tokens += ids
            trainable += trained
            doc_ids += [count] * len(ids)
            count += 1
    stream = TokenStream(torch.tensor(tokens, dtype=torch.int64), torch.tensor(doc_ids, dtype=torch.int64),
                         torch.tensor(trainable, dtype=torch.bool))
    logger.info("data: %d chat files, %d conversations, %d tokens (%d in assistant replies)", len(files), count,
                len(stream), sum(trainable))
    return stream
