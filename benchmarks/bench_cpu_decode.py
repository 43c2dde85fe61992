"""CPU decode paths side by side on real weights, to choose the defaults: eager with the dynamic cache, eager
with a static cache, ``compile=True`` (one-row products as inductor reductions, ``modeling.linear``) and
``compile="frozen"`` (inductor freezing + oneDNN prepacking), in fp32, bf16 and int8 weight-only; plus the
compile time of the first call, cold (an empty inductor cache) and warm (inductor's on-disk cache).

Decode tok/s is differential through ``generate`` (t(n new) - t(1 new), same prefill), batch 1, greedy, the
candidates interleaved in every repeat (medians). Tokens of every candidate are checked against eager.
Writes benchmarks/results/cpu-decode-<device>.json (device, versions, git sha). A script, never a timed
assertion.

    python benchmarks/bench_cpu_decode.py [--model PATH] [--new-tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = Path(os.environ.get("LLAMA_CORE_ASSETS", REPO.parent / "shared" / "assets")) / "smollm2" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 2,
          198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]

COMPILE_CHILD = """
import sys, time, torch
from llama_core import LlamaForCausalLM
from llama_core.generation import generate
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
ids = torch.tensor([%s])
t0 = time.perf_counter()
generate(model, ids, max_new_tokens=2, eos_token_id=[], compile=True)
print(time.perf_counter() - t0)
"""


def compile_seconds(model: Path, dtype: str, cache_dir: str) -> float:
    """The first compiled call in a fresh process with inductor's cache in ``cache_dir``."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, "-c", COMPILE_CHILD % PROMPT, str(model), dtype], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile-time", action="store_true", help="skip the cold/warm compile measurement")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from llama_core import LlamaForCausalLM
    from llama_core.bench.environment import device_name, environment, slug
    from llama_core.generation import generate

    ids = torch.tensor([PROMPT])
    record: dict = {"benchmark": "cpu_decode", "model": args.model.name, "new_tokens": args.new_tokens,
                    "prompt_tokens": len(PROMPT), "repeats": args.repeats, "threads": torch.get_num_threads(),
                    "load_average_start": os.getloadavg()[0], "runs": {}}
    for dtype, quant in (("float32", None), ("bfloat16", None), ("float32", "int8-weight-only"),
                         ("bfloat16", "int8-weight-only")):
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, quantize=quant)
        paths = {"eager-dynamic": {}, "eager-static": {"cache": "static"}, "compiled": {"compile": True},
                 "compiled-frozen": {"compile": "frozen"}}
        label = dtype + (f"+{quant}" if quant else "")
        tokens, first = {}, {}
        for name, kw in paths.items():  # warm up (and compile) each path once, outside the timing
            t0 = time.perf_counter()
            tokens[name] = generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=[], **kw)
            first[name] = time.perf_counter() - t0
        speeds: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.repeats):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                kw = paths[name]
                t0 = time.perf_counter()
                generate(model, ids, max_new_tokens=1, eos_token_id=[], **kw)
                t1 = time.perf_counter()
                generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=[], **kw)
                t2 = time.perf_counter()
                speeds[name].append((args.new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
        run = {}
        for name in paths:
            run[name] = {"tokens_per_s": statistics.median(speeds[name]), "all": speeds[name],
                         "first_call_s": first[name],
                         "same_tokens_as_eager": bool(torch.equal(tokens[name], tokens["eager-dynamic"]))}
            print(f"{label:26s} {name:16s} {run[name]['tokens_per_s']:7.1f} tok/s  first call {first[name]:5.1f} s  "
                  f"same tokens {run[name]['same_tokens_as_eager']}")
        record["runs"][label] = run
        del model
    if not args.no_compile_time:
        with tempfile.TemporaryDirectory() as cache:
            for dtype in ("float32", "bfloat16"):
                cold = compile_seconds(args.model, dtype, cache)
                warm = compile_seconds(args.model, dtype, cache)
                record.setdefault("compile_first_call_s", {})[dtype] = {"cold_cache": cold, "warm_cache": warm}
                print(f"compile=True first call, {dtype}: {cold:.1f} s with an empty inductor cache, "
                      f"{warm:.1f} s from the cache")
    env = environment("cpu")
    record |= {k: env[k] for k in ("device", "torch", "git_sha", "date") if k in env}
    record["load_average_end"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cpu-decode-{slug(device_name('cpu'))}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
