"""Fused RoPE (kernels/rope.py) against the eager reference and torch.compile of the reference.

    python benchmarks/bench_rope.py                      # CUDA: Llama-3-8B shapes, 1k..16k tokens, bf16
    python benchmarks/bench_rope.py --allow-cpu          # tiny smoke run in Triton's interpreter

GB/s counts the bytes of q and k read plus those written (the memory-bound minimum; position ids and
inv_freq are negligible); forward+backward counts both passes. Medians with 20/80 percentiles from
triton.testing.do_bench. Rows go to benchmarks/results/rope-<device>.json, a plot beside it when
matplotlib is importable. A script, never a timed assertion. The sweep itself is
``llama_core.bench.kernels.rope_rows`` (also run by ``llama-core bench`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--allow-cpu", action="store_true", help="tiny smoke run in Triton's interpreter")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.allow_cpu:
            print("bench_rope: no CUDA device; nothing to measure (use --allow-cpu for an interpreter smoke run)")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels.rope is imported
        args.tokens, args.heads, args.kv_heads, args.head_dim = [8], 4, 2, 64
        args.no_compile = True  # inductor on CPU needs a C++ toolchain; the smoke run checks the plumbing only

    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import device_name, environment
    from llama_core.bench.kernels import rope_rows

    env = environment(device)
    meta = dict({k: env[k] for k in ("device", "torch", "triton", "git_sha", "date")},
                dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)

    def show(r: dict) -> None:
        print(f"{r['mode']:17s} {r['impl']:14s} tokens={r['tokens']:6d} {r['ms']:9.4f} ms  {r['gbps']:8.1f} GB/s "
              f"[{r['gbps_p20']:.1f}, {r['gbps_p80']:.1f}]")

    rows = rope_rows(device, args.dtype, args.tokens, args.heads, args.kv_heads, args.head_dim,
                     not args.no_compile, repeats=2 if args.allow_cpu else 5, on_row=show)
    rows = [dict(meta, **{k: v for k, v in r.items() if k != "op"}) for r in rows]
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = RESULTS / f"rope-{slug}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot")
        return 0
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), sharey=True)
    for ax, mode in zip(axes, ("forward", "backward", "forward_backward"), strict=True):
        for impl in impls:
            sel = [r for r in rows if r["impl"] == impl and r["mode"] == mode]
            ax.errorbar([r["tokens"] for r in sel], [r["gbps"] for r in sel],
                        yerr=[[r["gbps"] - r["gbps_p20"] for r in sel], [r["gbps_p80"] - r["gbps"] for r in sel]],
                        marker="o", label=impl, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(f"RoPE {mode} ({args.dtype}, {args.heads}/{args.kv_heads} heads x {args.head_dim})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s (q, k read + written)")
    axes[0].legend()
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
