"""A LoRA fine-tune on the CPU: loss curve, tokens/s and memory of rank-16 LoRA (full-precision base and
weight-only int8 base) against full fine-tuning, through ``llama_core.train.train`` as ``llama-core train`` runs it.

    python benchmarks/bench_lora.py                                   # SmolLM2-135M (GGUF) from the shared assets
    python benchmarks/bench_lora.py --steps 20 --repeats 1 --variants lora lora-int8

The data is the tests' synthetic story corpus (tests/train_corpus.py): templated text, so a fine-tune's loss
visibly falls within a few dozen steps. Each run is a fresh child process (its max RSS is its own), and the
variants alternate order from one repeat to the next, so a shared machine's load falls on all alike.
Reported per run: losses, tokens/s (median over the steps after the first), peak RSS (``ru_maxrss``: it
includes loading, which builds the fp32 model before any quantisation) and the RSS after the last step (the
steady state: frozen base + adapters + optimizer). Rows go to benchmarks/results/lora-<device>.json with the
device, versions and git sha. A script, never a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> TrainConfig fields. LoRA's usual learning rate is ~10x full fine-tuning's (few, zero-started weights).
VARIANTS = {
    "lora": dict(lora_rank=16, lora_alpha=32, lora_targets=["q_proj", "v_proj"], lr=1e-3),
    "lora-int8": dict(lora_rank=16, lora_alpha=32, lora_targets=["q_proj", "v_proj"], lr=1e-3,
                      quantize_base="int8-weight-only"),
    "full": dict(lr=1e-4),
}


def _rss_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_once(variant: str, args: argparse.Namespace) -> dict:
    """One training run in this (fresh) process."""
    sys.path.insert(0, str(REPO))
    import torch

    from llama_core.train import TrainConfig, train
    from tests.train_corpus import write_corpus

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_corpus(Path(tmp) / "corpus")
        cfg = TrainConfig(data=str(data), output_dir=str(Path(tmp) / "out"), init_from=str(args.model),
                          doc_separator="\n\n", seq_len=args.seq_len, global_batch_size=args.batch,
                          micro_batch_size=args.batch, max_steps=args.steps, warmup_steps=1, progress=False,
                          export_hf=False, device="cpu", dtype="float32", **VARIANTS[variant])
        rss_after: list[int] = []
        result = train(cfg, on_step=lambda log: rss_after.append(_rss_bytes()))
    steps = result.logs
    return {"variant": variant, "losses": [log.loss for log in steps], "seconds": [log.seconds for log in steps],
            "tokens_per_s": statistics.median(log.tokens_per_s for log in steps[1:]) if len(steps) > 1 else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_last_step_bytes": rss_after[-1], "config": dict(VARIANTS[variant])}


def _child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", str(args.model), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict], variant: str, tokens_per_step: int) -> dict:
    """Per variant: mean losses, median tokens/s and, as the load-robust figure on a shared machine, the best
    step's tokens/s (a step cannot run faster than the machine allows, only slower when others compete)."""
    mine = [r for r in runs if r["variant"] == variant]
    return {"variant": variant, "runs": len(mine),
            "first_loss": statistics.mean(r["losses"][0] for r in mine),
            "last_loss": statistics.mean(r["losses"][-1] for r in mine),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "best_step_tokens_per_s": max(tokens_per_step / s for r in mine for s in r["seconds"][1:]),
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in mine) / 2**30,
            "rss_after_gib": max(r["rss_after_last_step_bytes"] for r in mine) / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="anything --init-from takes")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.child, args)))
        return 0

    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import environment, slug

    env = environment("cpu")
    runs = []
    for r in range(args.repeats):
        order = args.variants if r % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            run = _child(variant, args)
            runs.append(run)
            print(f"{variant:9s} loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}  "
                  f"{run['tokens_per_s']:7.1f} tok/s  peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB  "
                  f"after {run['rss_after_last_step_bytes'] / 2**30:.2f} GiB", flush=True)
    rows = [_summary(runs, v, args.batch * args.seq_len) for v in args.variants]
    if "full" in args.variants:
        full = next(row for row in rows if row["variant"] == "full")
        for row in rows:
            row["best_tokens_per_s_vs_full"] = row["best_step_tokens_per_s"] / full["best_step_tokens_per_s"]
            row["rss_after_vs_full"] = row["rss_after_gib"] / full["rss_after_gib"]
    for row in rows:
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lora-{slug(env['device'])}.json"
    out.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
                               "summary": rows, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
