"""Prefill and greedy-decode speed of llama_core next to transformers, on the same weights, in one run.

    python benchmarks/bench_forward.py                       # picks presets for the device it finds
    python benchmarks/bench_forward.py --preset llama3.2-1b --dtype bfloat16 --compile

A thin wrapper over ``llama_core.bench`` (the same measurements as ``llama-core bench``, without the load
and kernel benchmarks); kept for its flags. Ratios are what to read (machines are noisy); the record
goes to benchmarks/results/forward-<preset>-<device>.json. Records written before this script became a
wrapper (the H100 ones) use the older flat format: ``results`` rows with llama_core_s / transformers_s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_core.bench import default_settings, format_table, run_bench, write_record
from llama_core.bench.environment import slug

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b" if cuda else "synthetic-100m")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--prompt-lens", default="128,512,2048" if cuda else "64,256")
    p.add_argument("--decode-steps", type=int, default=128 if cuda else 32)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--compile", action="store_true", help="also time compiled llama_core (static cache decode)")
    args = p.parse_args()

    base = default_settings(args.device, quick=False)[0]
    settings = dataclasses.replace(
        base, preset=args.preset, layers=args.layers, dtype=args.dtype,
        prompt_lens=[int(x) for x in args.prompt_lens.split(",")], decode_tokens=args.decode_steps + 1,
        batch_sizes=[int(x) for x in args.batch_sizes.split(",")], repeats=args.repeats, compile=args.compile,
        load=False)
    record = run_bench([settings], kernels=False)
    print(format_table(record))
    path = write_record(record, RESULTS)
    out = RESULTS / f"forward-{args.preset}-{slug(record['environment']['device'])}.json"
    path.replace(out)
    print(f"recorded {out}")


if __name__ == "__main__":
    main()
