"""Text generation as small functions outside the model (gpt-fast style): greedy, sampling, beam search.

``generate(model, input_ids, ...)`` returns ``[rows, prompt + new]`` token ids exactly as transformers'
``generate`` does (rows finished early are padded after their EOS; the output ends at the step where the
last row finished), so greedy and beam outputs can be compared with theirs token for token.
``stream_generate`` is the iterator form. The arguments are checked and resolved in ``plan.py``, the
processors live in ``sampling.py``, beam search in ``beam_search.py``, the decode loop in
``decode_loop.py``; this file is the entry points and their results.

Host syncs: the greedy/sampling loop keeps everything on the device (tokens, the finished mask, positions,
the cache index) so a GPU can run ahead of Python. Whether all rows are finished is read back only every
``check_every`` steps (up to ``check_every - 1`` wasted forwards after the last EOS, cropped from the
output); stop strings and streamers need each token on the host and so check every step. Beam search
reads its stopping condition every step, as transformers does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..modeling.cache import StaticCache
from .beam_search import beam_search
from .decode_loop import _IncrementalText, _Runner, _TokenLoop
from .plan import STREAMING, Plan, Tokenizer, prepare


@dataclass
class GenerationOutput:
    """``generate(..., output_logprobs=True)``."""

    sequences: Tensor  # [rows, prompt + new]
    # [rows, new]: log-softmax of the *processed* distribution (after repetition penalty, n-gram ban and,
    # when sampling, temperature/top-k/top-p/min-p) at each chosen token: the distribution actually
    # sampled from. 0 after a row finished, so ``logprobs.sum(-1)`` is the completion's log-probability.
    logprobs: Tensor
    # Beam search only: transformers' ``sequences_scores``, sum(logprobs) / new_len ** length_penalty.
    sequences_scores: Tensor | None = None


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, num_return_sequences: int = 1, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | Literal["never"] = False,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop_strings: str | list[str] | None = None, tokenizer: Tokenizer | None = None,
             seed: int | None = None, generator: torch.Generator | None = None,
             streamer: Callable[[Any], None] | None = None, output_logprobs: bool = False,
             cache: Literal["dynamic", "static"] | StaticCache | None = None,
             compile: bool | Literal["frozen"] = False,
             check_every: int = 8) -> Tensor | GenerationOutput:
    """Continue ``input_ids [batch, prompt]`` (left-padded, with ``attention_mask``, for unequal lengths).

    Returns ``[batch * num_return_sequences, prompt + new]`` ids (rows of one prompt are adjacent), or a
    :class:`GenerationOutput` with ``output_logprobs=True``. All arguments are checked (ValueError) before
    the first forward (TypeError for an argument of the wrong type).

    - Greedy by default; ``do_sample=True`` samples after ``temperature``, ``top_k`` (0 = off), ``top_p``
      and ``min_p``, applied in that order as transformers' warpers (``temperature=0`` means greedy).
      Unlike transformers, ``top_k`` defaults to 0 (off), not 50. ``repetition_penalty`` and
      ``no_repeat_ngram_size`` apply to greedy, sampling and beams alike, over prompt + generated tokens.
    - Randomness: ``seed`` samples from a local ``torch.Generator`` seeded with it (the global RNG is left
      alone), ``generator`` continues one of yours (on the model's device); with neither, sampling draws
      from torch's default generator of the device, so ``torch.manual_seed(n)`` before ``generate`` makes
      it reproducible, as in transformers.
    - ``num_beams > 1``: beam search as transformers (``length_penalty``; ``early_stopping`` True, False or
      "never"); returns the best ``num_return_sequences`` beams per prompt.
    - ``eos_token_id``: one id or several (default ``config.eos_token_ids``; ``[]`` never stops early);
      ``pad_token_id`` fills rows after they finish (default ``config.pad_token_id``, else the first EOS).
    - ``stop_strings`` (needs ``tokenizer``, any object with ``decode(list[int]) -> str``): a row stops
      once the text of its new tokens contains one; it keeps the token that completed it.
    - ``streamer``: called with each new text piece (with a tokenizer; single sequence only; the pieces
      concatenate to the decoded completion) or, without a tokenizer, with the list of new token ids (one
      per row; pad for finished rows) at every step.
    - ``cache``: "dynamic" (default) or "static" (preallocated ``prompt + max_new_tokens`` slots; the
      default with ``compile``) or a ``StaticCache`` of yours, reset and reused, so compiled graphs are too.
      ``compile=True`` compiles the one-token decode step (``COMPILE_OPTIONS``). ``compile="frozen"``
      also folds the weights into the compiled graph as constants (``FROZEN_COMPILE_OPTIONS``, inductor's
      freezing: oneDNN-prepacked weights, the fast path on a CPU) for a model whose weights no longer
      change: the graph keeps the weights it was compiled with (``torch.compiler.reset()`` after changing
      them).
    - ``check_every``: steps between host reads of "all rows finished" (see the module docstring).
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "input_ids", "attention_mask")}
    events = _run(model, prepare(model, input_ids, attention_mask, options), streaming=streamer is not None)
    while True:
        try:
            item = next(events)
        except StopIteration as done:
            return done.value
        streamer(item)


def stream_generate(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    **kwargs: Any) -> Generator[Any, None, Tensor | GenerationOutput]:
    """Iterator form of :func:`generate` (same keywords, except ``streamer``; no beam search).

    Yields text pieces when ``tokenizer`` is given (single sequence only; they concatenate to the decoded
    completion), else at each step the list of new token ids, one per row (pad for finished rows). The
    generator's return value (``StopIteration.value``, or the result of ``yield from``) is what
    ``generate`` would have returned. Arguments are checked here, before the first ``next``.
    """
    if "streamer" in kwargs:
        raise ValueError("stream_generate is the streamer; pass no streamer")
    bound = inspect.signature(generate).bind(model, input_ids, attention_mask, **kwargs)
    bound.apply_defaults()
    options = {k: v for k, v in bound.arguments.items() if k not in ("model", "input_ids", "attention_mask")}
    plan = prepare(model, input_ids, attention_mask, {**options, "streamer": STREAMING})
    if plan.num_beams > 1:
        raise ValueError("stream_generate does not support beam search (beams are only final at the end)")
    return _run(model, plan, streaming=True)


@torch.no_grad()
def _run(model: torch.nn.Module, plan: Plan, streaming: bool) -> Generator[Any, None, Tensor | GenerationOutput]:
    """Generate; when ``streaming``, yield each step's text piece (with a tokenizer) or token ids."""
    if plan.max_new_tokens == 0:
        ids = plan.ids
        if plan.num_beams > 1:  # one row per beam -> one per returned sequence
            ids = ids.view(-1, plan.num_beams, ids.shape[1])[:, :plan.num_return_sequences].flatten(0, 1)
        return _finish(plan, ids, torch.zeros(ids.shape[0], 0, device=ids.device), None)
    if plan.num_beams > 1:
        sequences, logprobs, scores = beam_search(
            _Runner(model, plan), plan.ids, plan.mask, num_beams=plan.num_beams,
            max_new_tokens=plan.max_new_tokens, settings=plan.settings, eos=plan.eos, pad=plan.pad,
            length_penalty=plan.length_penalty, early_stopping=plan.early_stopping,
            num_return_sequences=plan.num_return_sequences, generator=plan.generator)
        return _finish(plan, sequences, logprobs, scores)
    # Streaming and stop strings read every token on the host anyway: check for the end at every step.
    loop = _TokenLoop(model, plan, check_every=1 if streaming or plan.stop else plan.check_every)
    text = _IncrementalText(plan.tokenizer) if streaming and plan.tokenizer is not None else None
    for tokens in loop.steps():
        if text is not None:
            if piece := text.push(tokens.tolist()):
                yield piece
        elif streaming:
            yield tokens.tolist()
    if text is not None and (piece := text.flush()):
        yield piece
    return _finish(plan, *loop.result(), None)


def _finish(plan: Plan, sequences: Tensor, logprobs: Tensor, scores: Tensor | None) -> Tensor | GenerationOutput:
    return GenerationOutput(sequences, logprobs, scores) if plan.output_logprobs else sequences
