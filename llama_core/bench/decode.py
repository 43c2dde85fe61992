"""Decode: greedy generation through each library's own ``generate``, at batch 1 and a larger batch
(llama.cpp, through its Python binding's ``Llama.generate``, at batch 1 only).

Decode speed is measured differentially, ``(new - 1) * batch / (t(new tokens) - t(1 token))``: both
``generate`` calls run the same prefill, so the difference is exactly ``new - 1`` one-token steps (the
first token comes from the prefill's logits), including each library's per-step overhead (logits
processing, stopping checks, cache updates), which is what a user of ``generate`` pays.
Like with like: same prompt ids, greedy, EOS disabled and ``min_new_tokens`` set, so every candidate produces
the full count (checked). The first call of each candidate is a warm-up, timed on its own: for a compiled
candidate it holds the compilation (``compile_s``), which is never part of the speed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from ..generation import generate
from ..modeling.cache import StaticCache
from . import llamacpp
from .prefill import REFERENCE, Progress
from .setup import BenchSettings, ModelPair
from .timing import PeakMemory, interleaved, quantiles, spread, time_call

Generate = Callable[[torch.Tensor, int], torch.Tensor]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix (int8 ones and their scales included), but of an
    input embedding only the looked-up rows (negligible), unless the lm_head reads it in full (tied and
    shared; a weight-only int8 head of a tied model is its own int8 copy)."""
    tensors = {id(t): t for t in model.parameters()}
    tensors.update({id(b): b for name, b in model.named_buffers() if name.endswith(("weight", "weight_scale"))})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    if head is None or head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes(model: torch.nn.Module, batch: int, context: float) -> float:
    """Bytes of K and V read by one step's attention over ``context`` cached tokens per row."""
    c = model.config
    elt = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elt * batch * context


def candidates(pair: ModelPair, settings: BenchSettings, batch: int) -> dict[str, tuple[Generate, int]]:
    """name -> (generate(ids, n), bytes of weights one step reads)."""
    ours, theirs = pair.ours, pair.theirs
    cpu = torch.device(settings.device).type == "cpu"

    def ours_fn(model: torch.nn.Module, compile: bool | str = False) -> tuple[Generate, int]:
        kwargs: dict[str, Any] = {}
        if compile is True and not cpu:
            # One StaticCache per candidate, reused by every call (as a server would): the CUDA-graphed step
            # takes the cache buffers as static inputs, and a new cache per generate call moves them, so each
            # call would re-record the graph, a cost the decode timing would charge to the steps.
            kwargs["cache"] = StaticCache(model.config, max_batch_size=batch,
                                          max_cache_len=settings.decode_prompt_len + settings.decode_tokens)
        return (lambda ids, n: generate(model, ids, max_new_tokens=n, eos_token_id=[], compile=compile, **kwargs),
                weight_bytes(model))

    fns = {"llama_core/eager": ours_fn(ours)}
    if settings.compile:  # static cache + the compiled one-token step: CUDA graphs on a GPU; on a CPU both the
        # frozen (oneDNN-prepacked weights) step and the plain one (matrix-vector products as inductor reductions)
        if cpu:
            fns["llama_core/compiled-frozen"] = ours_fn(ours, "frozen")
        fns["llama_core/compiled"] = ours_fn(ours, True)
    if pair.ours_int8 is not None:
        fns["llama_core/int8-weight-only"] = ours_fn(pair.ours_int8)
        if settings.compile:
            fns["llama_core/int8-weight-only-compiled"] = ours_fn(pair.ours_int8, True)
    if theirs is not None:
        def hf(ids: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0, **kw)

        fns[REFERENCE] = (lambda ids, n: hf(ids, n, disable_compile=True), weight_bytes(ours))
        # transformers compiles its forward automatically for a static cache, but only on accelerators.
        if settings.compile and not cpu:
            fns["transformers/static+compile"] = (lambda ids, n: hf(ids, n, cache_implementation="static"),
                                                  weight_bytes(ours))
    if batch == 1:  # the binding's generate decodes one sequence
        for mode, runner in pair.llama_cpp.items():
            def cpp(ids: torch.Tensor, n: int, runner: llamacpp.LlamaCppModel = runner) -> torch.Tensor:
                new = torch.tensor([runner.generate(ids[0].tolist(), n)], dtype=ids.dtype, device=ids.device)
                return torch.cat([ids, new], dim=1)

            fns[f"{llamacpp.IMPL}/{mode}"] = (cpp, runner.weight_bytes)
    return settings.keep(fns)


def common_prefix(a: torch.Tensor, b: torch.Tensor, start: int) -> int:
    """New tokens (after ``start``) that two outputs share before they first differ, the minimum over rows."""
    same = (a[:, start:].cpu() == b[:, start:].cpu()).int().cumprod(dim=1)
    return int(same.sum(dim=1).min())


def versus(decode: dict[str, list[float]], outputs: dict[str, torch.Tensor], name: str, ref: str, key: str,
           plen: int) -> dict[str, Any]:
    """``name`` against ``ref``: speed ratio (> 1: faster than ``ref``), its noise and token agreement. The ratio
    is of median decode times (a per-repeat ratio of two differences amplifies the noise); the per-repeat
    ratios' [min, max] beside it shows that noise."""
    if ref not in decode:
        return {}
    med, ref_med = statistics.median(decode[name]), statistics.median(decode[ref])
    ratios = [r / d for r, d in zip(decode[ref], decode[name], strict=True) if d > 0 and r > 0]
    other = key.removeprefix("vs_")
    return {key: ref_med / med if med > 0 and ref_med > 0 else None, f"{key}_spread": spread(ratios),
            f"same_tokens_as_{other}": bool(torch.equal(outputs[name].cpu(), outputs[ref].cpu())),
            f"common_prefix_with_{other}": common_prefix(outputs[name], outputs[ref], plen)}


@torch.inference_mode()
def bench_decode(pair: ModelPair, settings: BenchSettings, copy_bytes_per_s: float, progress: Progress,
                 on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Rows of every candidate at each batch size; ``on_batch(batch)`` is called as each batch size starts."""
    new, plen = settings.decode_tokens, settings.decode_prompt_len
    g = torch.Generator().manual_seed(settings.seed + 1)
    rows = []
    for batch in settings.batch_sizes:
        if on_batch is not None:
            on_batch(batch)
        fns = candidates(pair, settings, batch)
        ids = pair.prompts.ids(batch, plen, g, settings.device)
        memory, outputs, first = {}, {}, {}
        for name, (fn, _) in fns.items():
            progress(f"decode batch {batch} {name}: warm-up")
            first[name] = time_call(lambda fn=fn, ids=ids: fn(ids, new), settings.device)  # warm-up, compilation
            with PeakMemory(settings.device) as mem:
                out = fn(ids, new)
            fn(ids, 1)
            if out.shape != (batch, plen + new):
                raise RuntimeError(f"{name} generated {tuple(out.shape)} tokens, expected {(batch, plen + new)}")
            memory[name], outputs[name] = mem, out
        calls = {}
        for name, (fn, _) in fns.items():
            calls[f"{name}@{new}"] = lambda fn=fn, ids=ids: fn(ids, new)
            calls[f"{name}@1"] = lambda fn=fn, ids=ids: fn(ids, 1)
        progress(f"decode batch {batch}: timing")
        cmp = interleaved(calls, settings.device, settings.repeats, warmup=0)
        decode = {name: [a - b for a, b in zip(cmp.times[f"{name}@{new}"], cmp.times[f"{name}@1"], strict=True)]
                  for name in fns}
        steps = new - 1

        for name, (_, wbytes) in fns.items():
            impl, mode = name.split("/")
            stats = quantiles(decode[name])
            # A difference of two noisy times can come out <= 0 when the steps are short next to the noise
            # (tiny models, a busy machine): then there is no speed to report, only the flag.
            med = stats["median_s"]
            ok = med > 0
            # every library's KV cache is in the run's dtype (llama.cpp's is set so)
            gbs = (wbytes + kv_bytes(pair.ours, batch, plen + new / 2)) * steps / med if ok else None
            generate_s = statistics.median(cmp.times[f"{name}@{new}"])
            row = {
                "bench": "decode", "batch": batch, "prompt_tokens": plen, "new_tokens": new, "impl": impl,
                "mode": mode, **stats, "reliable": ok and stats["p20_s"] > 0,
                "tok_s": batch * steps / med if ok else None, "ms_per_step": med / steps * 1e3,
                "generate_s": generate_s, "first_call_s": first[name],
                # the first call's excess over a steady one: compilation (and one-off warm-up) time
                "compile_s": max(first[name] - generate_s, 0.0),
                "weight_bytes": wbytes,  # what one step reads (int8 keeps lm_head in full precision; Q8_0 not)
                "gb_s": gbs / 1e9 if ok else None, "frac_copy_bw": gbs / copy_bytes_per_s if ok else None,
                "peak_mem_bytes": memory[name].peak, "added_mem_bytes": memory[name].added,
                "vs_transformers": None, "same_tokens_as_transformers": None,
                **versus(decode, outputs, name, REFERENCE, "vs_transformers", plen),
            }
            if impl == "llama_core" and pair.llama_cpp:
                row.update(versus(decode, outputs, name, llamacpp.counterpart(mode, settings.dtype), "vs_llama_cpp",
                                  plen))
            rows.append(row)
        progress(f"decode batch {batch}: done")
    return rows
