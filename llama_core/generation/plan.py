"""The plan of one ``generate`` call: its arguments checked (ValueError before any forward) and resolved
(defaults from the config, rows expanded per returned sequence or beam, the sampling settings, the cache).

The decode loop and beam search read only the plan, never the raw keyword arguments.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..modeling.cache import StaticCache
from .sampling import LogitsSettings

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """All generation needs from a tokenizer (stop strings, text streaming)."""

    def decode(self, ids: list[int]) -> str: ...


STREAMING = object()  # marks a stream_generate call in the options (a streamer that is not a callable)


@dataclass
class Plan:
    """Checked and resolved arguments; ``ids``/``mask`` are expanded to one row per returned sequence
    (per beam for beam search) and live on the model's input device."""

    ids: Tensor
    mask: Tensor | None  # None when nothing is padded
    settings: LogitsSettings
    max_new_tokens: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    eos: list[int]
    pad: int | None
    stop: list[str]
    tokenizer: Tokenizer | None
    generator: torch.Generator | None
    output_logprobs: bool
    cache: str | StaticCache
    compile: bool | str  # False, True or "frozen"
    check_every: int


# Arguments that must be numbers; a string ("0.7", from a config file or a CLI parsed by hand), a bool or a float
# where a count belongs would otherwise fail deep inside a comparison or torch op with an unnamed TypeError.
_INT_ARGS = ("max_new_tokens", "num_beams", "num_return_sequences", "top_k", "no_repeat_ngram_size", "check_every")
_REAL_ARGS = ("temperature", "top_p", "min_p", "repetition_penalty", "length_penalty")


def _check_types(o: dict[str, Any]) -> dict[str, Any]:
    """TypeError naming the argument for a wrong type; numpy/torch-free ints and floats returned as Python's."""
    o = dict(o)
    for name in (*_INT_ARGS, "seed"):
        value = o[name]
        if name == "seed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        o[name] = int(value)
    for name in _REAL_ARGS:
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number (int or float), got {type(value).__name__} {value!r}")
        o[name] = float(value)
        if not math.isfinite(o[name]):
            raise ValueError(f"{name} must be finite, got {value!r}")
    return o


def prepare(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
            o: dict[str, Any]) -> Plan:
    o = _check_types(o)
    config = model.config
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().num_embeddings

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    check(isinstance(input_ids, Tensor) and input_ids.dim() == 2 and not input_ids.is_floating_point()
          and input_ids.numel() > 0, "input_ids must be a non-empty [batch, seq] integer tensor, got "
          f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    check(is_int(o["max_new_tokens"]) and o["max_new_tokens"] >= 0,
          f"max_new_tokens must be an integer >= 0, got {o['max_new_tokens']!r}")
    check(is_int(o["num_beams"]) and o["num_beams"] >= 1, f"num_beams must be an integer >= 1, got {o['num_beams']!r}")
    nrs = o["num_return_sequences"]
    check(is_int(nrs) and nrs >= 1, f"num_return_sequences must be an integer >= 1, got {nrs!r}")
    check(o["temperature"] >= 0, f"temperature must be >= 0 (0 means greedy), got {o['temperature']}")
    check(is_int(o["top_k"]) and o["top_k"] >= 0, f"top_k must be an integer >= 0 (0 = off), got {o['top_k']!r}")
    check(0 < o["top_p"] <= 1, f"top_p must be in (0, 1], got {o['top_p']}")
    check(0 <= o["min_p"] <= 1, f"min_p must be in [0, 1], got {o['min_p']}")
    check(o["repetition_penalty"] > 0, f"repetition_penalty must be > 0, got {o['repetition_penalty']}")
    check(is_int(o["no_repeat_ngram_size"]) and o["no_repeat_ngram_size"] >= 0,
          f"no_repeat_ngram_size must be an integer >= 0, got {o['no_repeat_ngram_size']!r}")
    check(o["early_stopping"] in (True, False, "never"),
          f"early_stopping must be True, False or 'never', got {o['early_stopping']!r}")
    check(is_int(o["check_every"]) and o["check_every"] >= 1, f"check_every must be >= 1, got {o['check_every']!r}")

    do_sample = bool(o["do_sample"])
    if do_sample and o["temperature"] == 0:
        logger.info("temperature=0 with do_sample=True: decoding greedily")
        do_sample = False
    beams = o["num_beams"]
    if beams > 1:
        check(nrs <= beams, f"num_return_sequences ({nrs}) must be <= num_beams ({beams})")
    else:
        check(nrs == 1 or do_sample, f"num_return_sequences={nrs} with greedy decoding would return {nrs} "
              "identical rows; use do_sample=True or num_beams >= num_return_sequences")

    eos = config.eos_token_ids if o["eos_token_id"] is None else o["eos_token_id"]
    eos = [eos] if is_int(eos) else list(eos)
    check(all(is_int(e) and 0 <= e < vocab for e in eos), f"eos_token_id must be ids in [0, {vocab}), got {eos}")
    pad = o["pad_token_id"]
    if pad is None:
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    check(pad is None or (is_int(pad) and 0 <= pad < vocab), f"pad_token_id must be an id in [0, {vocab}), got {pad}")

    stop = [o["stop_strings"]] if isinstance(o["stop_strings"], str) else list(o["stop_strings"] or [])
    check(all(isinstance(s, str) and s for s in stop), f"stop_strings must be non-empty strings, got {stop}")
    tokenizer = o["tokenizer"]
    check(not stop or tokenizer is not None, "stop_strings need a tokenizer (an object with decode(ids) -> str)")
    check(tokenizer is None or callable(getattr(tokenizer, "decode", None)),
          f"tokenizer must have a decode(ids) -> str method, got {type(tokenizer).__name__}")
    streamer = o["streamer"]
    check(streamer is None or streamer is STREAMING or callable(streamer), "streamer must be a callable")
    if beams > 1:
        check(streamer is None and not stop, "streamer and stop_strings are not supported with beam search")
    elif streamer is not None and tokenizer is not None:
        check(input_ids.shape[0] * nrs == 1, "text streaming needs a single sequence (batch 1, one return "
              "sequence); stream token ids (no tokenizer) for several rows")

    cache = "static" if o["cache"] is None and o["compile"] else o["cache"] or "dynamic"
    check(isinstance(cache, StaticCache) or cache in ("dynamic", "static"),
          f"cache must be 'dynamic', 'static' or a StaticCache, got {cache!r}")
    check(o["compile"] in (True, False, "frozen"), f"compile must be True, False or 'frozen', got {o['compile']!r}")
    check(not (o["compile"] and cache == "dynamic"), "compile=True needs a static cache (cache='static')")

    check(o["seed"] is None or o["generator"] is None, "pass seed or generator, not both")
    generator = o["generator"]
    if generator is not None:
        check(isinstance(generator, torch.Generator) and generator.device.type == device.type,
              f"generator must be a torch.Generator on the model's device ({device})")
    elif do_sample and o["seed"] is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(o["seed"])
    # With neither, generator stays None: sampling draws from torch's default generator of the device, so
    # torch.manual_seed(n) (or transformers.set_seed) before generate makes it reproducible, as in transformers.

    # Inputs: in the vocabulary, left padding only, every row with at least one real token (host reads,
    # once per call).
    check(bool(((input_ids >= 0) & (input_ids < vocab)).all()), f"input_ids must be in [0, {vocab})")
    ids = input_ids.to(device)
    mask = None
    if attention_mask is not None:
        check(attention_mask.shape == input_ids.shape,
              f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = attention_mask.to(device).long()
        check(bool(((mask == 0) | (mask == 1)).all()), "attention_mask must hold only 0 and 1")
        check(bool((mask[:, 1:] >= mask[:, :-1]).all()) and bool(mask[:, -1].all()),
              "attention_mask must be left-padded (zeros first, then ones, at least one real token per row); "
              "pad prompts on the left for generation")
        prompt_len = int(mask.sum(-1).max())
        if bool(mask.all()):
            mask = None  # no padding: lets the model skip masks entirely
    else:
        prompt_len = ids.shape[1]
    check(stop == [] or pad is not None or ids.shape[0] * max(nrs, beams) == 1,
          "stop_strings on several rows need a pad_token_id (rows that stop early are padded)")

    limit, new = config.max_position_embeddings, o["max_new_tokens"]
    if config.rope_type != "dynamic":  # dynamic NTK rope is built to run past its trained length
        check(prompt_len <= limit, f"the prompt has {prompt_len} tokens, more than the model's "
              f"max_position_embeddings ({limit})")
        if prompt_len + new > limit:
            logger.warning("prompt (%d) + max_new_tokens (%d) exceeds max_position_embeddings (%d): the model "
                           "was not trained on positions that far", prompt_len, new, limit)
    rows = ids.shape[0] * (beams if beams > 1 else nrs)
    if isinstance(cache, StaticCache):
        check(cache.max_batch_size >= rows and cache.max_cache_len >= ids.shape[1] + new,
              f"the StaticCache ({cache.max_batch_size} rows x {cache.max_cache_len}) is too small for "
              f"{rows} rows x {ids.shape[1] + new} tokens")

    expand = beams if beams > 1 else nrs
    if expand > 1:  # one row per returned sequence (or beam), rows of one prompt adjacent (as transformers)
        ids = ids.repeat_interleave(expand, 0)
        mask = None if mask is None else mask.repeat_interleave(expand, 0)
    eos_keep = len(eos) + 1 if eos else 2  # transformers' min_tokens_to_keep for beams
    settings = LogitsSettings(
        repetition_penalty=float(o["repetition_penalty"]), no_repeat_ngram_size=o["no_repeat_ngram_size"],
        do_sample=do_sample, temperature=float(o["temperature"]), top_k=o["top_k"], top_p=float(o["top_p"]),
        min_p=float(o["min_p"]), min_tokens_to_keep=eos_keep if beams > 1 else 1)
    return Plan(ids, mask, settings, new, beams, nrs, float(o["length_penalty"]), o["early_stopping"], eos,
                pad, stop, tokenizer, generator, bool(o["output_logprobs"]), cache, o["compile"],
                o["check_every"])
