"""Prefill: one forward over a prompt of n tokens, returning the last position's logits (what generation
needs), timed side by side for llama_core (eager, compiled) and transformers (eager)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .setup import BenchSettings, ModelPair
from .timing import PeakMemory, interleaved, quantiles

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
    if pair.theirs is not None:
        fns[REFERENCE] = lambda ids: pair.theirs(ids, use_cache=False, logits_to_keep=1)
    return fns


@torch.inference_mode()
def bench_prefill(pair: ModelPair, settings: BenchSettings, progress: Progress) -> list[dict[str, Any]]:
    vocab = pair.ours.config.vocab_size
    fns = candidates(pair, settings)
    g = torch.Generator().manual_seed(settings.seed)
    rows = []
    for n in settings.prompt_lens:
        ids = torch.randint(0, vocab, (1, n), generator=g).to(settings.device)
        calls = {name: (lambda f=f, ids=ids: f(ids)) for name, f in fns.items()}
        memory = {}
        for name, call in calls.items():
            progress(f"prefill {n} {name}: warm-up")
            call()  # warm-up (and compilation): allocator, kernel selection, graphs
            with PeakMemory(settings.device) as mem:
                call()
            memory[name] = mem
        progress(f"prefill {n}: timing")
        cmp = interleaved(calls, settings.device, settings.repeats, warmup=0)
        flops = prefill_flops(pair.ours, n)
        for name in calls:
            impl, mode = name.split("/")
            stats = quantiles(cmp.times[name])
            rows.append({"bench": "prefill", "tokens": n, "batch": 1, "impl": impl, "mode": mode, **stats,
                         "tok_s": n / stats["median_s"], "tflops": flops / stats["median_s"] / 1e12,
                         "peak_mem_bytes": memory[name].peak, "added_mem_bytes": memory[name].added,
                         "vs_transformers": cmp.ratio(REFERENCE, name) if REFERENCE in calls else None})
        progress(f"prefill {n}: done")
    return rows
