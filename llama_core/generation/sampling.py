"""Logits processors and token samplers: small pure functions on ``logits [rows, vocab]``.

Semantics follow ``transformers``' processors (same names, same edge cases) so ``generate`` can be compared
with theirs token for token: ``RepetitionPenaltyLogitsProcessor``, ``NoRepeatNGramLogitsProcessor`` and the
warpers ``Temperature``, ``TopK``, ``TopP``, ``MinP``, applied in that order (``process_logits``). Filtered
entries become ``-inf``; every filter keeps at least ``min_tokens_to_keep`` tokens.

Nothing here synchronises with the host, so a decode loop on a GPU can queue steps ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitsSettings:
    """What ``process_logits`` applies; the defaults change nothing."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False  # the warpers below only act when sampling (as in transformers)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1  # beam search keeps n_eos + 1 so a live beam always has a non-EOS option


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Penalise every token already present once (CTRL, Keskar et al. 2019): positive logits are divided by
    ``penalty``, negative ones multiplied, so ``penalty > 1`` always lowers them. ``seen [rows, vocab]`` is a
    bool mask of the tokens in the (unpadded) prompt and the generated text."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(ids: Tensor, vocab_size: int, valid: Tensor | None = None) -> Tensor:
    """Bool ``[rows, vocab]`` mask of the ids in ``ids [rows, len]`` where ``valid`` (1 = real token) holds.

    Invalid positions and ids past the logits' vocabulary (an embedding larger than the head) go to a spare
    column that is dropped, as transformers does.
    """
    ids = ids.clamp(max=vocab_size)
    if valid is not None:
        ids = ids.masked_fill(~valid.bool(), vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def ban_repeated_ngrams(logits: Tensor, ids: Tensor, n: int, valid: Tensor | None = None) -> Tensor:
    """Forbid any token that would complete an n-gram already present in ``ids [rows, len]``.

    Vectorised as transformers does it: the last ``n - 1`` tokens are matched against every window; a match
    bans the window's last token. Unlike transformers, windows touching padding (``valid == 0``) never match,
    so a left-padded row bans exactly what it would ban alone.
    """
    rows, length = ids.shape
    if length < n:
        return logits
    vocab = logits.shape[-1]
    prefix = ids[:, length + 1 - n:]  # [rows, n - 1]
    windows = ids.unfold(1, n, 1)  # [rows, length - n + 1, n]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)
    if valid is not None:
        valid = valid.bool()
        matches &= valid.unfold(1, n, 1).all(-1) & valid[:, length + 1 - n:].all(-1, keepdim=True)
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=ids.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return logits.masked_fill(banned[:, :vocab], float("-inf"))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    return logits / temperature


def top_k_filter(logits: Tensor, k: int, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep the ``k`` largest logits (and any tied with the k-th, as transformers)."""
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose probability
    reaches ``p``. Computed as transformers does (ascending sort, drop the prefix with mass <= 1 - p), which
    keeps the token that crosses the threshold."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative <= 1 - p
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(-1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's (Nguyen et al. 2024)."""
    probs = logits.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return logits.masked_fill(remove, float("-inf"))


def warp(logits: Tensor, settings: LogitsSettings) -> Tensor:
    """The sampling warpers in transformers' order: temperature, top-k, top-p, min-p.

    Temperature comes first so the filters see the distribution that is actually sampled (for min-p this is
    the llama.cpp convention transformers adopted)."""
    keep = settings.min_tokens_to_keep
    if settings.temperature != 1.0:
        logits = apply_temperature(logits, settings.temperature)
    if settings.top_k > 0:
        logits = top_k_filter(logits, settings.top_k, keep)
    if settings.top_p < 1.0:
        logits = top_p_filter(logits, settings.top_p, keep)
    if settings.min_p > 0.0:
        logits = min_p_filter(logits, settings.min_p, keep)
    return logits


def process_logits(logits: Tensor, settings: LogitsSettings, ids: Tensor | None = None,
                   valid: Tensor | None = None, seen: Tensor | None = None) -> Tensor:
    """All processors in transformers' order: repetition penalty, n-gram ban, then (sampling only) the warpers.

    ``ids [rows, len]`` / ``valid`` are the sequences so far (needed for the n-gram ban); ``seen`` the
    repetition-penalty mask (computed from ``ids`` when not given).
    """
    if settings.repetition_penalty != 1.0:
        if seen is None:
            if ids is None:
                raise ValueError("repetition_penalty needs the sequences (ids) or a seen-token mask")
            seen = seen_tokens(ids, logits.shape[-1], valid)
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        if ids is None:
            raise ValueError("no_repeat_ngram_size needs the sequences (ids)")
        logits = ban_repeated_ngrams(logits, ids, settings.no_repeat_ngram_size, valid)
    if settings.do_sample:
        logits = warp(logits, settings)
    return logits


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs [rows, vocab]`` (need not be normalised), without a host sync.

    ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` i.i.d. picks i with probability ``p_i / sum(p)`` (the
    exponential race, as in gpt-fast); unlike ``torch.multinomial`` it never synchronises with the host and
    traces under ``torch.compile``. Zero-probability tokens are never chosen.
    """
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(1.0, generator=generator)
    # exponential_ may return exactly 0 on some backends; p / 0 would be inf (or NaN for p == 0).
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.argmax(probs.float() / noise, dim=-1)
