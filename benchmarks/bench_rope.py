"""Fused RoPE (kernels/rope.py) against the eager reference and torch.compile of the reference.

    python benchmarks/bench_rope.py                      # CUDA: Llama-3-8B shapes, 1k..16k tokens, bf16
    python benchmarks/bench_rope.py --allow-cpu          # tiny smoke run in Triton's interpreter

GB/s counts the bytes of q and k read plus those written (the memory-bound minimum; position ids and
inv_freq are negligible); forward+backward counts both passes. Medians with 20/80 percentiles from
triton.testing.do_bench. Rows go to benchmarks/results/rope-<device>.json, a plot beside it when
matplotlib is importable. A script, never a timed assertion.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LLAMA_CORE_GIT_SHA", "unknown")


def bench(fn, device: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100))
    fn()
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def calls(fn, q, k, pos, inv_freq, gq, gk):
    """(mode, callable, passes over q and k) for the forward and the forward+backward of ``fn``."""
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()

    def forward():
        return fn(q, k, pos, inv_freq)

    def forward_backward():
        out = fn(qg, kg, pos, inv_freq)
        torch.autograd.backward(out, (gq, gk))
        qg.grad = kg.grad = None

    graph = fn(qg, kg, pos, inv_freq)

    def backward():  # the backward pass alone, on a recorded graph
        torch.autograd.grad(graph, (qg, kg), (gq, gk), retain_graph=True)

    return ("forward", forward, 1), ("backward", backward, 1), ("forward_backward", forward_backward, 2)


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
    import triton

    from kernels.rope import rope, rope_ref
    from llama_core.rope import llama3_rope

    dtype = getattr(torch, args.dtype)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    inv_freq = llama3_rope(args.head_dim, 500000.0, scaling, 131072)[0].to(device)
    compiled_ref = None if args.no_compile else torch.compile(rope_ref, dynamic=False)
    impls = {"triton": rope, "torch_eager": rope_ref}
    if compiled_ref is not None:
        impls["torch_compile"] = compiled_ref

    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    rows = []
    for tokens in args.tokens:
        batch, seq = 1, tokens
        q = torch.randn(batch, seq, args.heads, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, seq, args.kv_heads, args.head_dim, device=device, dtype=dtype)
        pos = torch.arange(seq, device=device)[None]
        io_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write of q and k, one pass
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        for name, fn in impls.items():
            for mode, call, passes in calls(fn, q, k, pos, inv_freq, gq, gk):
                ms, p20, p80 = bench(call, device, args.allow_cpu)
                gbps = [passes * io_bytes / (t * 1e-3) / 1e9 for t in (ms, p80, p20)]  # p80 time -> p20 GB/s
                rows.append(dict(meta, impl=name, mode=mode, tokens=tokens, ms=ms, ms_p20=p20, ms_p80=p80,
                                 gbps=gbps[0], gbps_p20=gbps[1], gbps_p80=gbps[2]))
                print(f"{mode:17s} {name:14s} tokens={tokens:6d} {ms:9.4f} ms  {gbps[0]:8.1f} GB/s "
                      f"[{gbps[1]:.1f}, {gbps[2]:.1f}]")

    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
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
        for name in impls:
            sel = [r for r in rows if r["impl"] == name and r["mode"] == mode]
            ax.errorbar([r["tokens"] for r in sel], [r["gbps"] for r in sel],
                        yerr=[[r["gbps"] - r["gbps_p20"] for r in sel], [r["gbps_p80"] - r["gbps"] for r in sel]],
                        marker="o", label=name, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(f"RoPE {mode} ({args.dtype}, {args.heads}/{args.kv_heads} heads x {args.head_dim})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s (q, k read + written)")
    axes[0].legend()
    fig.suptitle(device_name)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
