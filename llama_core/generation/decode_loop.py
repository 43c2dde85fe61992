"""The decode loop behind ``generate``: feeding the model (prefill, then one token per row per step, with a
dynamic or static cache, optionally through a compiled step), greedy/sampled token selection with the
finished mask kept on the device, stop strings and incremental text for streamers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.cache import DynamicCache, StaticCache
from .sampling import process_logits, sample, seen_tokens

if TYPE_CHECKING:
    from .plan import Plan, Tokenizer

# torch.compile options for the one-token decode step; the prefill always runs eagerly (its shape varies).
# dynamic=False: each model (and batch size) gets a graph specialised to its shapes. Left to dynamo, a second
# shape in one process turns the dimensions symbolic: slower generic kernels, and SDPA refuses a symbolic
# enable_gqa flag.
COMPILE_OPTIONS: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
# compile="frozen": inductor's freezing treats the weights as constants, folds them into the graph and, on a
# CPU, prepacks them for oneDNN's matmuls instead of MKL's gemv (which ran single-threaded at ~12 GB/s on a
# 2-core EPYC with 32 GB/s of memory bandwidth). Measured on a 100M fp32 model there, same tokens as eager:
# one-token steps 1.05-1.15x faster at batch 1, 1.25x at batch 8, for ~250 MB more RSS (the packed copies).
# No CUDA graphs with it (mode and options exclude each other). Weights changed after compiling are not
# seen (dynamo does not guard on tensor values): for inference only.
FROZEN_COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False, "options": {"freezing": True}}


def _decode_step(model: torch.nn.Module, cache: Any, tokens: Tensor, position_ids: Tensor,
                 cache_position: Tensor | None, attention_mask: Tensor | None) -> Tensor:
    """One token per row -> next-token logits ``[rows, vocab]``; the function torch.compile traces."""
    return model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                 use_cache=True, cache_position=cache_position, logits_to_keep=1).logits[:, -1]


_compiled_steps: dict[str, Callable[..., Tensor]] = {}


def _compiled_decode_step(frozen: bool = False) -> Callable[..., Tensor]:
    """Compiled once per process and option set: dynamo guards (not our code) tell models and shapes apart,
    and the StaticCache is an argument, so a new cache of the same shape reuses the graph."""
    options = FROZEN_COMPILE_OPTIONS if frozen else COMPILE_OPTIONS
    key = repr(sorted(options.items()))
    if key not in _compiled_steps:
        # A distinct function object per option set: dynamo caches graphs per code object, and a frozen
        # graph must never serve an unfrozen call (or the reverse).
        step = _decode_step if not frozen else _frozen_step
        _compiled_steps[key] = torch.compile(step, **options)
    return _compiled_steps[key]


def _frozen_step(model: torch.nn.Module, cache: Any, tokens: Tensor, position_ids: Tensor,
                 cache_position: Tensor | None, attention_mask: Tensor | None) -> Tensor:
    return model(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                 use_cache=True, cache_position=cache_position, logits_to_keep=1).logits[:, -1]


def run_step(step_fn: Callable[..., Tensor], args: tuple, compiled: bool, skip_guards: bool) -> Tensor:
    """One decode step through ``step_fn`` (``_decode_step`` or its compiled form). ``skip_guards``: this call
    passes the same model, cache and shapes as an earlier one whose guards picked the graph, so they would
    pass again: skip them (~1 ms per step for a 30-layer model on a CPU, about a tenth of a bf16 SmolLM2
    step)."""
    if not compiled:
        return step_fn(*args)
    torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay are consumed (copied)
    if skip_guards:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return step_fn(*args)
    return step_fn(*args)


class _Runner:
    """Feeds the model: one prefill, then one token per row per call. Owns the cache, the padding mask and
    the positions; per step nothing is read back to the host and, with a static cache, every tensor handed
    to the model keeps its shape (the mask is preallocated with the new columns already 1; positions and
    the cache index are device tensors), which is what a compiled, CUDA-graphed step needs."""

    def __init__(self, model: torch.nn.Module, plan: Plan):
        self.model = model
        rows, prompt = plan.ids.shape
        self.device = plan.ids.device
        if isinstance(plan.cache, StaticCache):
            plan.cache.reset()
            self.cache: DynamicCache | StaticCache = plan.cache
        elif plan.cache == "static":
            # Buffers are allocated at the prefill next to each layer (also for models split across devices).
            self.cache = StaticCache(model.config, max_batch_size=rows, max_cache_len=prompt + plan.max_new_tokens)
        else:
            self.cache = DynamicCache()
        self.static = isinstance(self.cache, StaticCache)
        self.mask = None if plan.mask is None else F.pad(plan.mask, (0, plan.max_new_tokens), value=1)
        self.length = prompt  # tokens in the cache after the prefill (host int, known without a sync)
        # Position of each row's next token: counted over real tokens, so left padding shifts nothing.
        self.positions = (torch.full((rows, 1), prompt, device=self.device) if plan.mask is None
                          else plan.mask.sum(-1, keepdim=True))
        self.cache_position = torch.tensor([prompt], device=self.device)
        self.step_fn = _compiled_decode_step(plan.compile == "frozen") if plan.compile else _decode_step
        self.compiled = bool(plan.compile)
        self.guarded = False  # a compiled step has run with its guards checked (then they can be skipped)

    def prefill(self, ids: Tensor) -> Tensor:
        n = ids.shape[1]
        out = self.model(ids, attention_mask=None if self.mask is None else self.mask[:, :n],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(n, device=self.device) if self.static else None)
        return out.logits[:, -1].to(self.device, torch.float32, copy=True)

    def step(self, tokens: Tensor) -> Tensor:
        """``tokens [rows]`` -> next logits ``[rows, vocab]`` (fp32, a copy the caller may keep)."""
        if self.static:  # fixed shapes: the whole mask (causality hides future slots), explicit cache index
            mask, cache_position = self.mask, self.cache_position
        else:
            mask = None if self.mask is None else self.mask[:, :self.length + 1]
            cache_position = None
        logits = run_step(self.step_fn, (self.model, self.cache, tokens[:, None], self.positions, cache_position,
                                         mask), self.compiled, skip_guards=self.guarded)
        self.guarded = self.compiled and self.static
        self.length += 1
        self.positions = self.positions + 1
        self.cache_position = self.cache_position + 1
        return logits.to(self.device, torch.float32, copy=True)

    def reorder(self, index: Tensor) -> None:
        """Beam search: row i continues old row ``index[i]`` (rows stay within their prompt's group, so the
        mask and positions need no reordering)."""
        self.cache.reorder(index)  # StaticCache reorders in place, keeping its buffers' addresses


# ---------------------------------------------------------------------------------------- greedy / sampling

class _TokenLoop:
    """Greedy or sampled decoding of all rows at once. ``steps()`` yields each step's tokens ``[rows]`` (on
    the device); ``result()`` returns the sequences and logprobs cropped to the steps actually needed."""

    def __init__(self, model: torch.nn.Module, plan: Plan, check_every: int):
        self.plan, self.check_every = plan, check_every
        self.runner = _Runner(model, plan)
        rows, self.prompt = plan.ids.shape
        new, device = plan.max_new_tokens, plan.ids.device
        fill = plan.pad if plan.pad is not None else 0
        self.tokens = F.pad(plan.ids, (0, new), value=fill)  # [rows, prompt + new], written in place
        self.valid = None if plan.mask is None else F.pad(plan.mask, (0, new), value=1).bool()
        self.logprobs = torch.zeros(rows, new, device=device)
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.taken = torch.zeros((), dtype=torch.long, device=device)  # steps during which a row was unfinished
        self.eos = torch.tensor(plan.eos, device=device) if plan.eos else None
        self.stop = _StopStrings(plan.stop, plan.tokenizer, rows) if plan.stop else None

    def steps(self) -> Iterator[Tensor]:
        plan, settings, p = self.plan, self.plan.settings, self.prompt
        logits = self.runner.prefill(plan.ids)
        # Repetition penalty: a running seen-token mask, updated per step instead of rescanning all ids.
        seen = seen_tokens(plan.ids, logits.shape[-1], plan.mask) if settings.repetition_penalty != 1 else None
        for step in range(plan.max_new_tokens):
            cur = p + step
            scores = process_logits(logits, settings, self.tokens[:, :cur],
                                    None if self.valid is None else self.valid[:, :cur], seen)
            tokens = sample(scores.softmax(-1), plan.generator) if settings.do_sample else scores.argmax(-1)
            if plan.pad is not None:  # finished rows produce pad (their logits are computed but unused)
                tokens = torch.where(self.unfinished, tokens, plan.pad)
            self.tokens[:, cur] = tokens
            if plan.output_logprobs:
                chosen = scores.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
                self.logprobs[:, step] = torch.where(self.unfinished, chosen, 0.0)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            self.taken += self.unfinished.any()
            if self.eos is not None:
                self.unfinished &= ~torch.isin(tokens, self.eos)
            if self.stop is not None:
                for row in self.stop.update(tokens.tolist(), self.unfinished.tolist()):
                    self.unfinished[row] = False
            yield tokens
            if step + 1 == plan.max_new_tokens:
                break
            if (self.eos is not None or self.stop is not None) and (step + 1) % self.check_every == 0 \
                    and not bool(self.unfinished.any()):
                break
            logits = self.runner.step(tokens)

    def result(self) -> tuple[Tensor, Tensor]:
        n = int(self.taken)  # the one host read of the loop when nothing else needed one
        return self.tokens[:, :self.prompt + n], self.logprobs[:, :n]


class _StopStrings:
    """Host-side stop strings: a row stops once the text of its new tokens contains one."""

    def __init__(self, strings: list[str], tokenizer: Tokenizer, rows: int):
        self.strings, self.tokenizer = strings, tokenizer
        self.new: list[list[int]] = [[] for _ in range(rows)]
        # A string completed by the latest token lies in the text of the last few tokens (each adds at least
        # one character, except byte pieces: up to 4 per character), so only that window is decoded: O(1)
        # per step instead of O(length). One spare token keeps a leading-space strip off the match.
        self.window = 4 * max(len(s) for s in strings) + 4

    def update(self, tokens: list[int], unfinished: list[bool]) -> list[int]:
        """Record this step's tokens; return the rows that just completed a stop string."""
        done = []
        for row, (token, alive) in enumerate(zip(tokens, unfinished, strict=True)):
            if alive:
                self.new[row].append(token)
                text = self.tokenizer.decode(self.new[row][-self.window:])
                if any(s in text for s in self.strings):
                    done.append(row)
        return done


class _IncrementalText:
    """New text of a growing token list, without decoding token by token (which breaks characters split
    over several byte tokens and drops SentencePiece's word-initial spaces). The tail since the last
    emitted boundary is decoded with and without the new tokens and the difference emitted, holding it
    back while it ends in an incomplete character (U+FFFD); the pieces concatenate to ``decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoded window
        self.read = 0  # end of what has been emitted

    def push(self, tokens: list[int]) -> str:
        self.ids.extend(tokens)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
