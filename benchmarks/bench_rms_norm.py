"""Fused Triton RMSNorm vs the eager reference vs torch.compile(reference), forward and forward+backward.

    python benchmarks/bench_rms_norm.py                      # CUDA: sweep hidden sizes and token counts
    python benchmarks/bench_rms_norm.py --dtype float16 --residual
    TRITON_INTERPRET=1 python benchmarks/bench_rms_norm.py --allow-cpu   # smoke run, tiny sizes

GB/s = bytes read + written (the minimum traffic of a fused kernel) / median time; 20th and 80th
percentiles alongside. Rows go to benchmarks/results/rms_norm-<device>.json with device, versions, git sha.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.rms_norm import rms_norm, rms_norm_ref

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LLAMA_CORE_GIT_SHA", "unknown")


def bench(fn, device: str) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device == "cuda":
        import triton

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[3]


def traffic(m: int, n: int, elt: int, residual: bool, backward: bool) -> int:
    fwd = m * n * elt * (4 if residual else 2) + n * elt  # x (+ residual in, sum out), y; weight
    if not backward:
        return fwd
    # backward reads x (or the sum), dy (+ d residual), writes dx; weight in, dW out
    return fwd + m * n * elt * (4 if residual else 3) + 2 * n * elt


def make_fns(f, x, w, eps, r, dy):
    def fwd():
        with torch.no_grad():
            return f(x, w, eps, r)

    inputs = [x, w] + ([r] if r is not None else [])

    def fwd_bwd():  # autograd.grad, not .backward(): no .grad accumulation kernels in the timing
        out = f(x, w, eps, r)
        torch.autograd.grad(out[0] if r is not None else out, inputs, dy)

    return fwd, fwd_bwd


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
    dtype = getattr(torch, args.dtype)
    eps = 1e-6
    compiled = None if args.no_compile else torch.compile(rms_norm_ref)
    impls = {"triton": rms_norm, "eager": rms_norm_ref}
    if compiled is not None:
        impls["compile"] = compiled
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    rows = []
    for n in args.hidden:
        for m in args.tokens:
            x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            r = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) if args.residual else None
            dy = torch.randn(m, n, device=device, dtype=dtype)
            for name, f in impls.items():
                fwd, fwd_bwd = make_fns(f, x, w, eps, r, dy)
                for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    med, p20, p80 = bench(fn, device)
                    nbytes = traffic(m, n, dtype.itemsize, r is not None, mode != "fwd")
                    row = dict(impl=name, mode=mode, tokens=m, hidden=n, dtype=args.dtype,
                               residual=args.residual, ms=med, ms_p20=p20, ms_p80=p80,
                               gbps=nbytes / med / 1e6, gbps_p20=nbytes / p80 / 1e6,
                               gbps_p80=nbytes / p20 / 1e6)
                    rows.append(row)
                    print(f"{name:8s} {mode:8s} {m:6d} x {n:6d}  {med:8.3f} ms  {row['gbps']:8.1f} GB/s")

    meta = dict(device=dev_name, torch=torch.__version__, triton=_triton_version(), git_sha=git_sha(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    RESULTS.mkdir(exist_ok=True)
    slug = dev_name.lower().replace(" ", "-").replace("/", "-")
    out = RESULTS / f"rms_norm-{slug}.json"
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"), dev_name)


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    tokens = max(r["tokens"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
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
