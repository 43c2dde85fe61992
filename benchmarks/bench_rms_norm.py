"""Fused Triton RMSNorm vs the eager reference vs torch.compile(reference): forward, backward, forward+backward.

    python benchmarks/bench_rms_norm.py                      # CUDA: sweep hidden sizes and token counts
    python benchmarks/bench_rms_norm.py --dtype float16 --residual
    TRITON_INTERPRET=1 python benchmarks/bench_rms_norm.py --allow-cpu   # smoke run, tiny sizes

GB/s = bytes read + written (the minimum traffic of a fused kernel) / median time; 20th and 80th
percentiles alongside. Rows go to benchmarks/results/rms_norm-<device>.json with device, versions, git sha.
The sweep itself is ``llama_core.bench.kernels.rms_norm_rows`` (also run by ``llama-core bench`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_core.bench.environment import device_name, environment
from llama_core.bench.kernels import rms_norm_rows

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--residual", action="store_true", help="benchmark the fused residual add too")
    ap.add_argument("--hidden", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--allow-cpu", action="store_true", help="smoke run on CPU (Triton interpreter)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.allow_cpu:
            print("bench_rms_norm: no CUDA device; GB/s on CPU mean nothing. "
                  "Use --allow-cpu (with TRITON_INTERPRET=1) for a smoke run.")
            return
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.hidden, args.tokens = [64, 320], [8]

    def show(r: dict) -> None:
        print(f"{r['impl']:8s} {r['mode']:8s} {r['tokens']:6d} x {r['hidden']:6d}  {r['ms']:8.3f} ms  "
              f"{r['gbps']:8.1f} GB/s")

    rows = rms_norm_rows(device, args.dtype, args.hidden, args.tokens, args.residual, not args.no_compile,
                         on_row=show)
    for r in rows:
        del r["op"]  # the record's rows keep their original fields
    env = environment(device)
    meta = {k: env[k] for k in ("device", "torch", "triton", "git_sha", "date")}
    dev_name = device_name(device)
    RESULTS.mkdir(exist_ok=True)
    slug = dev_name.lower().replace(" ", "-").replace("/", "-")
    out = RESULTS / f"rms_norm-{slug}.json"
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"), dev_name)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    tokens = max(r["tokens"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "bwd", "fwd+bwd"), strict=True):
        for impl in sorted({r["impl"] for r in rows}):
            sel = [r for r in rows if r["impl"] == impl and r["mode"] == mode and r["tokens"] == tokens]
            ax.plot([r["hidden"] for r in sel], [r["gbps"] for r in sel], marker="o", label=impl)
        ax.set(xscale="log", xlabel="hidden size", title=f"{mode}, {tokens} tokens")
    axes[0].set_ylabel("GB/s")
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
