"""Prefill and greedy-decode speed of llama_core next to transformers, on the same weights, in one run.

    python benchmarks/bench_forward.py                       # picks presets for the device it finds
    python benchmarks/bench_forward.py --preset llama3.2-1b --dtype bfloat16 --compile

Ratios are what to read (machines are noisy); the JSON record under benchmarks/results/ names the device,
versions and git sha. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from llama_core import DynamicCache, LlamaForCausalLM, StaticCache

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_loop(model, prompt, steps: int, cache):
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    return token


def compiled_decode(model, prompt, steps: int, cache: StaticCache, step_fn):
    cache.reset()
    n = prompt.shape[1]
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    for i in range(steps):
        pos = torch.tensor([n + i], device=prompt.device)
        token = step_fn(token, pos).argmax(-1).clone()
    return token


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b" if cuda else "tinyllama-1.1b")
    p.add_argument("--layers", type=int, default=None if cuda else 4, help="override num_hidden_layers")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--prompt-lens", default="128,512,2048" if cuda else "64,256")
    p.add_argument("--decode-steps", type=int, default=128 if cuda else 32)
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--compile", action="store_true", help="also time StaticCache + torch.compile decoding")
    args = p.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(args.device):
            LlamaForCausalLM.from_preset(args.preset, **overrides).to(dtype).save_pretrained(tmp)
        ours = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, device=args.device)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        theirs = theirs.to(args.device).eval()
    vocab = ours.config.vocab_size
    rows = []
    lengths = [int(x) for x in args.prompt_lens.split(",")]
    with torch.inference_mode():
        for n in lengths:  # warm both up (allocator, cuBLAS heuristics, clocks) before timing either
            ids = torch.randint(0, vocab, (1, n), device=args.device)
            for _ in range(2):
                ours(ids), theirs(ids)
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), device=args.device)
            flops = ours.floating_point_ops(n, seq_len=n, training=False)
            t_ours = timed(lambda ids=ids: ours(ids), args.device, args.repeats)
            t_hf = timed(lambda ids=ids: theirs(ids), args.device, args.repeats)
            rows.append({"bench": "prefill", "tokens": n, "llama_core_s": t_ours, "transformers_s": t_hf,
                         "llama_core_tflops": flops / t_ours / 1e12, "speedup": t_hf / t_ours})
        prompt = torch.randint(0, vocab, (1, 128), device=args.device)
        steps = args.decode_steps
        t_ours = timed(lambda: decode_loop(ours, prompt, steps, DynamicCache()), args.device, args.repeats)
        t_hf = timed(lambda: decode_loop(theirs, prompt, steps, transformers.DynamicCache(config=theirs.config)),
                     args.device, args.repeats)
        row = {"bench": "decode", "tokens": steps, "llama_core_tok_s": steps / t_ours,
               "transformers_tok_s": steps / t_hf, "speedup": t_hf / t_ours}
        if args.compile:
            cache = StaticCache(ours.config, 1, 128 + steps + 1, dtype=dtype, device=args.device)

            def step(token, pos):
                return ours(token, position_ids=pos[None], past_key_values=cache, use_cache=True,
                            cache_position=pos).logits[:, -1:]

            step_fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
            compiled_decode(ours, prompt, steps, cache, step_fn)  # compile + capture
            t_c = timed(lambda: compiled_decode(ours, prompt, steps, cache, step_fn), args.device, args.repeats)
            row["llama_core_compiled_static_tok_s"] = steps / t_c
        rows.append(row)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    sha = sha or os.environ.get("LLAMA_CORE_GIT_SHA", "unknown")  # copies without .git (remote GPU runs)
    record = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "git_sha": sha, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": vars(args), "params": ours.num_parameters(), "results": rows}
    print(f"{args.preset} ({ours.num_parameters() / 1e9:.2f}B params, {args.dtype}) on {device_name}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    RESULTS.mkdir(exist_ok=True)
    slug = device_name.replace(" ", "-").lower()
    out = RESULTS / f"forward-{args.preset}-{slug}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
