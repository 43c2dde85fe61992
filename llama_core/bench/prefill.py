"""Prefill: one forward over a prompt of n tokens, returning the last position's logits (what generation
needs), timed side by side for llama_core (eager, compiled, int8-weight-only), transformers (eager) and
llama.cpp (``eval`` of the prompt into an empty KV cache)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import llamacpp
from .setup import BenchSettings, ModelPair
from .timing import PeakMemory, interleaved, quantiles, spread, time_call

Progress = Callable[[str], None]
REFERENCE = "transformers/eager"


def prefill_flops(model: torch.nn.Module, n: int) -> int:
    """Forward FLOPs of an n-token prompt with logits for the last position only (PaLM convention:
    2 per weight per token, attention scores counted without causal halving)."""
    c = model.config
    return model.floating_point_ops(n, seq_len=n, training=False) - 2 * c.hidden_size * c.vocab_size * (n - 1)


def candidates(pair: ModelPair, settings: BenchSettings) -> dict[str, Callable[[torch.Tensor], Any]]:
    """name -> forward(ids). ``use_cache=False``: a prefill's cache write is a reference (dynamic) or a
    copy of the K/V it just computed, small next to the matmuls, and keeps compiled graphs cache-free."""
    fns: dict[str, Callable[[torch.Tensor], Any]] = {
        "llama_core/eager": lambda ids: pair.ours(ids, use_cache=False, logits_to_keep=1),
    }
    if settings.compile:
        compiled = torch.compile(pair.ours, dynamic=False)  # one graph per prompt length
        fns["llama_core/compiled"] = lambda ids: compiled(ids, use_cache=False, logits_to_keep=1)
    if pair.ours_int8 is not None:
        fns["llama_core/int8-weight-only"] = lambda ids: pair.ours_int8(ids, use_cache=False, logits_to_keep=1)
    if pair.theirs is not None:
        fns[REFERENCE] = lambda ids: pair.theirs(ids, use_cache=False, logits_to_keep=1)
    for mode, runner in pair.llama_cpp.items():
        fns[f"{llamacpp.IMPL}/{mode}"] = lambda ids, runner=runner: runner.prefill(ids[0].tolist())
    return settings.keep(fns)


def ratio_fields(cmp: Any, name: str, reference: str, key: str) -> dict[str, Any]:
    """``{key: median per-repeat time ratio, key_spread: [min, max]}`` of ``reference`` over ``name``."""
    if reference not in cmp.times:
        return {}
    ratios = cmp.ratios(reference, name)
    return {key: cmp.ratio(reference, name), f"{key}_spread": spread(ratios)}


@torch.inference_mode()
def bench_prefill(pair: ModelPair, settings: BenchSettings, progress: Progress) -> list[dict[str, Any]]:
    fns = candidates(pair, settings)
    g = torch.Generator().manual_seed(settings.seed)
    rows = []
    for n in settings.prompt_lens:
        ids = pair.prompts.ids(1, n, g, settings.device)
        calls = {name: (lambda f=f, ids=ids: f(ids)) for name, f in fns.items()}
        memory, first = {}, {}
        for name, call in calls.items():
            progress(f"prefill {n} {name}: warm-up")
            first[name] = time_call(call, settings.device)  # warm-up (and compilation): allocator, kernels, graphs
            with PeakMemory(settings.device) as mem:
                call()
            memory[name] = mem
        progress(f"prefill {n}: timing")
        cmp = interleaved(calls, settings.device, settings.repeats, warmup=0)
        flops = prefill_flops(pair.ours, n)
        for name in calls:
            impl, mode = name.split("/")
            stats = quantiles(cmp.times[name])
            row = {"bench": "prefill", "tokens": n, "batch": 1, "impl": impl, "mode": mode, **stats,
                   "tok_s": n / stats["median_s"], "tflops": flops / stats["median_s"] / 1e12,
                   "peak_mem_bytes": memory[name].peak, "added_mem_bytes": memory[name].added,
                   "first_call_s": first[name], "vs_transformers": None,
                   **ratio_fields(cmp, name, REFERENCE, "vs_transformers")}
            if impl == "llama_core" and pair.llama_cpp:
                row.update(ratio_fields(cmp, name, llamacpp.counterpart(mode, settings.dtype), "vs_llama_cpp"))
            rows.append(row)
        progress(f"prefill {n}: done")
    return rows
