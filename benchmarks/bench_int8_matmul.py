"""int8 GEMMs (W8A8 and weight-only) against bf16 torch.matmul (cuBLAS) and torch._int_mm at Llama-3-8B
shapes, plus end-to-end batch-1 decode of a model in full precision vs its int8 modes.

    python benchmarks/bench_int8_matmul.py                 # CUDA: M in 1..4096, 8B shapes; 8B-shaped decode
    python benchmarks/bench_int8_matmul.py --cpu           # this machine's CPU paths, small shapes, fp32

Targets (issue 6, H100): W8A8 >= 1.5x bf16 at M >= 512; weight-only >= 1.6x bf16 at M <= 16; 8B-shaped
decode with int8 >= 1.5x bf16. Rows go to benchmarks/results/int8-<device>.json (device, versions, git sha)
with a plot beside it when matplotlib is importable. The sweeps are ``llama_core.bench.int8`` (also run by
``llama-core bench`` on a GPU). A script, never a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="measure the CPU paths (small shapes, fp32)")
    parser.add_argument("--m", type=int, nargs="+", help="rows of the activation (default: the issue's sweep)")
    parser.add_argument("--decode-preset", help="model for the decode rows (default llama3-8b on CUDA)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="eager decode (default: static cache + compile)")
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import device_name, environment
    from llama_core.bench.int8 import LLAMA_SHAPES, M_VALUES, int8_decode_rows, int8_matmul_rows

    if not torch.cuda.is_available() and not args.cpu:
        print("bench_int8_matmul: no CUDA device; nothing to measure (--cpu measures the CPU paths)")
        return 0
    device = "cpu" if args.cpu else "cuda"
    dtype = "float32" if args.cpu else "bfloat16"
    m_values = args.m or ((1, 16, 512) if args.cpu else M_VALUES)
    shapes = ((1024, 1024), (1024, 2816), (2816, 1024)) if args.cpu else LLAMA_SHAPES
    preset = args.decode_preset or ("synthetic-100m" if args.cpu else "llama3-8b")
    compile = not args.no_compile and not args.cpu  # inductor on CPU needs a C++ toolchain

    env = environment(device)
    meta = {k: env[k] for k in ("device", "torch", "triton", "git_sha", "date")}

    def show(r: dict) -> None:
        if r["op"] == "int8_matmul":
            speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
            print(f"M={r['m']:5d} K={r['k']:6d} N={r['n']:6d} {r['impl']:13s} {r['ms']:9.4f} ms "
                  f"{r['tflops']:8.2f} TFLOP/s {r['gbps']:8.1f} GB/s  {speed}")
        else:
            print(f"decode {r['preset']} {r['mode']:17s} {r['tokens_per_s']:8.1f} tok/s  "
                  f"{r['speedup_vs_full']:.2f}x  {r['footprint_bytes'] / 2**30:.2f} GiB")

    rows = int8_matmul_rows(device, m_values, shapes, dtype, on_row=show)
    if not args.no_decode:
        rows += int8_decode_rows(device, preset, dtype, args.decode_tokens, compile, on_row=show)
    rows = [dict(meta, **r) for r in rows]

    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    out = RESULTS / f"int8-{slug}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot")
        return
    gemm = [r for r in rows if r["op"] == "int8_matmul"]
    shapes = list(dict.fromkeys((r["k"], r["n"]) for r in gemm))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True, squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in gemm):
            pts = [(r["m"], r["speedup_vs_dense"]) for r in gemm if (r["k"], r["n"]) == (k, n)
                   and r["impl"] == impl and r["speedup_vs_dense"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={k} N={n}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speedup vs dense matmul (bf16 on GPU)")
    axes[0][-1].legend()
    fig.suptitle(f"int8 GEMMs on {rows[0]['device']} (torch {rows[0]['torch']}, git {rows[0]['git_sha']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
