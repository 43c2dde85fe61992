"""Decode: greedy generation through each library's own ``generate``, at batch 1 and a larger batch.

Decode speed is measured differentially, ``(new - 1) * batch / (t(new tokens) - t(1 token))``: both
``generate`` calls run the same prefill, so the difference is exactly ``new - 1`` one-token steps (the
first token comes from the prefill's logits), including each library's per-step overhead (logits
processing, stopping checks, cache updates), which is what a user of ``generate`` pays.
Like with like: same prompt, greedy, EOS disabled and ``min_new_tokens`` set, so every candidate produces
the full count (checked).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..generation import generate
from .prefill import REFERENCE, Progress
from .setup import BenchSettings, ModelPair
from .timing import PeakMemory, interleaved, quantiles

Generate = Callable[[torch.Tensor, int], torch.Tensor]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix, but of an untied input embedding only the
    looked-up rows (negligible); a tied embedding is read in full by the lm_head."""
    total = model.get_memory_footprint(return_buffers=False)
    if not model.config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes(model: torch.nn.Module, batch: int, context: float) -> float:
    """Bytes of K and V read by one step's attention over ``context`` cached tokens per row."""
    c = model.config
    elt = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elt * batch * context


def candidates(pair: ModelPair, settings: BenchSettings) -> dict[str, Generate]:
    ours, theirs = pair.ours, pair.theirs
    fns: dict[str, Generate] = {
        "llama_core/eager": lambda ids, n: generate(ours, ids, max_new_tokens=n, eos_token_id=[]),
    }
    if settings.compile:  # static cache + the compiled one-token step: CUDA graphs on a GPU, frozen
        # (oneDNN-prepacked) weights on a CPU, each device's fast path
        cpu = torch.device(settings.device).type == "cpu"
        fns["llama_core/compiled-frozen" if cpu else "llama_core/compiled"] = (
            lambda ids, n: generate(ours, ids, max_new_tokens=n, eos_token_id=[], compile="frozen" if cpu else True))
    if theirs is not None:
        def hf(ids: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0, **kw)

        fns[REFERENCE] = lambda ids, n: hf(ids, n, disable_compile=True)
        # transformers compiles its forward automatically for a static cache, but only on accelerators.
        if settings.compile and torch.device(settings.device).type == "cuda":
            fns["transformers/static+compile"] = lambda ids, n: hf(ids, n, cache_implementation="static")
    return fns


@torch.inference_mode()
def bench_decode(pair: ModelPair, settings: BenchSettings, copy_bytes_per_s: float,
                 progress: Progress) -> list[dict[str, Any]]:
    fns = candidates(pair, settings)
    vocab, new, plen = pair.ours.config.vocab_size, settings.decode_tokens, settings.decode_prompt_len
    g = torch.Generator().manual_seed(settings.seed + 1)
    rows = []
    for batch in settings.batch_sizes:
        ids = torch.randint(0, vocab, (batch, plen), generator=g).to(settings.device)
        memory, outputs = {}, {}
        for name, fn in fns.items():
            progress(f"decode batch {batch} {name}: warm-up")
            fn(ids, new)  # warm-up and compilation
            with PeakMemory(settings.device) as mem:
                out = fn(ids, new)
            fn(ids, 1)
            if out.shape != (batch, plen + new):
                raise RuntimeError(f"{name} generated {tuple(out.shape)} tokens, expected {(batch, plen + new)}")
            memory[name], outputs[name] = mem, out
        calls = {}
        for name, fn in fns.items():
            calls[f"{name}@{new}"] = lambda fn=fn, ids=ids: fn(ids, new)
            calls[f"{name}@1"] = lambda fn=fn, ids=ids: fn(ids, 1)
        progress(f"decode batch {batch}: timing")
        cmp = interleaved(calls, settings.device, settings.repeats, warmup=0)
        decode = {name: [a - b for a, b in zip(cmp.times[f"{name}@{new}"], cmp.times[f"{name}@1"], strict=True)]
                  for name in fns}
        steps = new - 1
        step_bytes = weight_bytes(pair.ours) + kv_bytes(pair.ours, batch, plen + new / 2)
        for name in fns:
            impl, mode = name.split("/")
            stats = quantiles(decode[name])
            # A difference of two noisy times can come out <= 0 when the steps are short next to the noise
            # (tiny models, a busy machine): then there is no speed to report, only the flag.
            ok = stats["median_s"] > 0
            med = stats["median_s"]
            ref = statistics.median(decode[REFERENCE]) if REFERENCE in decode else None
            gbs = step_bytes * steps / med if ok else None
            rows.append({
                "bench": "decode", "batch": batch, "prompt_tokens": plen, "new_tokens": new, "impl": impl,
                "mode": mode, **stats, "reliable": ok and stats["p20_s"] > 0,
                "tok_s": batch * steps / med if ok else None, "ms_per_step": med / steps * 1e3,
                "generate_s": statistics.median(cmp.times[f"{name}@{new}"]),
                "gb_s": gbs / 1e9 if ok else None, "frac_copy_bw": gbs / copy_bytes_per_s if ok else None,
                "peak_mem_bytes": memory[name].peak, "added_mem_bytes": memory[name].added,
                # > 1: faster than transformers' generate (ratio of median decode times; a per-repeat ratio
                # of two differences would amplify the noise)
                "vs_transformers": ref / med if ok and ref is not None and ref > 0 else None,
                "same_tokens_as_transformers": bool(torch.equal(outputs[name].cpu(), outputs[REFERENCE].cpu()))
                if REFERENCE in outputs else None,
            })
        progress(f"decode batch {batch}: done")
    return rows
