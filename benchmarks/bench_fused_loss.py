"""Peak memory and time of lm_head + cross entropy, loss and backward: the chunked (fused) loss against the
plain path that builds the full ``[tokens, vocab]`` logits, at Llama 3's 128256-token vocabulary.

    python benchmarks/bench_fused_loss.py                          # CUDA if available, else CPU
    python benchmarks/bench_fused_loss.py --tokens 4096 --repeats 3 --hidden 2048

Each measurement runs in a fresh child process (the CPU's peak is the process's max RSS, which only grows;
on CUDA ``torch.cuda.max_memory_allocated``), alternating fused and plain, so a shared machine's load falls
on both alike. Peaks are counted above the inputs (hidden states, weight, targets); they include the two
gradients (``[tokens, hidden]`` and ``[vocab, hidden]``) that both paths must return. Target (issue 17):
the fused path's memory beyond those gradients at most 1/8 of the plain path's fp32 logits, and no slower.
Rows go to benchmarks/results/fused-loss-<device>.json (device, versions, git sha). A script, never a timed
assertion.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    """Resident set size now (not the peak): the baseline the child's peak is measured from."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def measure_once(path: str, tokens: int, hidden_size: int, vocab: int, dtype: str, device: str) -> dict:
    """One loss + backward in this (fresh) process: seconds and peak bytes above the inputs."""
    sys.path.insert(0, str(REPO))
    from llama_core.modeling.fused_loss import fused_linear_cross_entropy

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    # Filled in place: a temporary here would raise the CPU's max RSS above the baseline and hide the peak.
    hidden = torch.empty(tokens, hidden_size, device=device, dtype=dt).normal_().requires_grad_()
    weight = torch.empty(vocab, hidden_size, device=device, dtype=dt).normal_(0, 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    if path == "fused":
        loss = fused_linear_cross_entropy(hidden, weight, targets)
    else:
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = hidden.grad.nbytes + weight.grad.nbytes
    return {"path": path, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "dtype": dtype,
            "seconds": seconds, "peak_bytes": peak - base, "grad_bytes": grads, "loss": loss.item()}


def _child(args: argparse.Namespace, path: str, tokens: int, warmup: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device]
    if warmup:  # CUDA: a first tiny call loads the kernels, so the timed call is not the first
        cmd.append("--warmup")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--child", choices=["fused", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        if args.warmup:
            measure_once(args.child, 256, args.hidden, args.vocab, args.dtype, args.device)
        print(json.dumps(measure_once(args.child, args.tokens[0], args.hidden, args.vocab, args.dtype,
                                      args.device)))
        return 0

    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import environment, slug

    env = environment(args.device)
    runs = []
    for r in range(args.repeats):
        for tokens in args.tokens:
            order = ("plain", "fused") if r % 2 == 0 else ("fused", "plain")  # interleaved, alternating first
            for path in order:
                run = _child(args, path, tokens, args.device.startswith("cuda"))
                runs.append(run)
                print(f"{path:5s} {tokens:6d} tokens  {run['seconds']:8.2f} s  peak {run['peak_bytes'] / 2**30:6.2f} GiB"
                      f"  (grads {run['grad_bytes'] / 2**30:.2f} GiB)  loss {run['loss']:.4f}", flush=True)
    rows = [_summary(runs, tokens, args.vocab) for tokens in args.tokens]
    for row in rows:
        print(f"{row['tokens']} tokens: fused/plain time {row['time_ratio']:.2f}, peak {row['peak_ratio']:.3f}; "
              f"fused beyond grads / plain fp32 logits {row['fused_extra_vs_logits']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"fused-loss-{slug(env['device'])}.json"
    out.write_text(json.dumps({"environment": env, "args": {k: v for k, v in vars(args).items() if k != "child"},
                               "summary": rows, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _summary(runs: list[dict], tokens: int, vocab: int) -> dict:
    """Medians over repeats for one token count."""
    def median(path: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["path"] == path and r["tokens"] == tokens)

    fused_s, plain_s = median("fused", "seconds"), median("plain", "seconds")
    fused_peak, plain_peak = median("fused", "peak_bytes"), median("plain", "peak_bytes")
    logits = tokens * vocab * 4
    return {"tokens": tokens, "fused_seconds": fused_s, "plain_seconds": plain_s, "time_ratio": fused_s / plain_s,
            "fused_peak_bytes": fused_peak, "plain_peak_bytes": plain_peak, "peak_ratio": fused_peak / plain_peak,
            "plain_fp32_logits_bytes": logits,
            "fused_extra_vs_logits": (fused_peak - median("fused", "grad_bytes")) / logits}


if __name__ == "__main__":
    raise SystemExit(main())
