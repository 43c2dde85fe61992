"""A chat fine-tune of a real model on CPU, as `llama-core train` runs it: loss curve, tokens/s and peak RSS of
rank-16 LoRA with and without the fused loss and the fused document masking, over an int8 base, and of full
fine-tuning.

    python benchmarks/bench_finetune.py                      # SmolLM2-135M-Instruct from ../shared/assets
    python benchmarks/bench_finetune.py --steps 12 --seq-len 1024 --repeats 2

The chat set is generated here (deterministic): arithmetic questions answered in one sentence, a few turns per
conversation, so the loss (on the assistant replies only) has something real to learn. Every configuration
runs the real CLI in a fresh child process, in alternating order when repeated; its peak RSS is recorded
twice: the process's (loading the checkpoint included) and training's alone (the high-water mark reset once
the model is loaded); tokens/s is the median over the steps after the first (the first pays for allocation and warm-up).
Rows go to benchmarks/results/finetune-<device>.json with device, versions and git sha. A script, never a
timed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = Path(os.environ.get("LLAMA_CORE_ASSETS", REPO.parent / "shared" / "assets")) / "smollm2"

# name -> CLI flags; the first is the default configuration of `llama-core train` with LoRA. DENSE_MASK is not a
# CLI flag: the child forces the model's dense-mask fallback (document_attention.choose_backend -> "dense"),
# which is what packed training ran on before the fused document masking.
DENSE_MASK = "--bench-force-dense-mask"
LORA = ["--lora-rank", "16", "--lora-alpha", "32",
        "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
CONFIGS = {
    "fused loss + fused document masking (default)": LORA,
    "plain loss (full logits)": [*LORA, "--no-fused-loss"],
    "dense [b,1,t,t] document mask": [*LORA, DENSE_MASK],
    "plain loss + dense mask (before issue 17)": [*LORA, "--no-fused-loss", DENSE_MASK],
    "LoRA over an int8 base": [*LORA, "--quantize-base", "int8-weight-only"],
    # every weight trains; full fine-tuning's usual learning rate is ~10x below LoRA's
    "full fine-tuning (no LoRA)": ["--lr", "1e-4"],
}

# Runs the CLI in this child and reports its own peak RSS (ru_maxrss: KiB on Linux) on the last line.
CHILD = """
import json, resource, sys
from llama_core.cli import main
from llama_core.modeling import document_attention
args = sys.argv[1:]
if "DENSE_MASK" in args:
    args.remove("DENSE_MASK")
    document_attention.choose_backend = lambda *a, **k: "dense"
# Peak RSS of training alone: the high-water mark is reset (Linux: clear_refs 5) once the model is loaded,
# when the optimizer is built, so the checkpoint's loading peak does not hide the step's.
from llama_core.train import loop
make_optimizer = loop.make_optimizer
def reset_then_make_optimizer(*a, **k):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return make_optimizer(*a, **k)
loop.make_optimizer = reset_then_make_optimizer
rc = main(args)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "training_peak_rss_bytes": hwm}))
""".replace("DENSE_MASK", DENSE_MASK)


def write_chat_set(path: Path, conversations: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(conversations):
            messages = [{"role": "system", "content": "You are a careful calculator. Answer in one sentence."}]
            for _ in range(rng.randint(1, 3)):
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                op, value = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
                messages += [{"role": "user", "content": f"What is {a} {op} {b}?"},
                             {"role": "assistant", "content": f"{a} {op} {b} is {value}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_config(name: str, flags: list[str], model: str, data: Path, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    cli = ["train", "--init-from", model, "--data", str(data), "--format", "chat", "--seq-len",
           str(args.seq_len), "--global-batch-size", str(args.batch), "--micro-batch-size", "1", "--max-steps",
           str(args.steps), "--warmup-steps", "2", "--lr", "1e-3", "--output-dir", str(out), "--no-progress",
           "--no-export-hf", "--log-every", "1", "--device", "cpu", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, "-c", CHILD, *cli], capture_output=True, text=True, env=env, cwd=REPO)
    last = proc.stdout.strip().splitlines()[-1:] or ["{}"]
    status = json.loads(last[0]) if last[0].startswith("{") else {}
    if proc.returncode != 0 or status.get("rc") != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    peak, training_peak = status["max_rss_bytes"], status["training_peak_rss_bytes"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"config": name, "flags": flags, "losses": [s["loss"] for s in steps],
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:]),
            "step_seconds": [args.batch * args.seq_len / s["tokens_per_s"] for s in steps],
            "peak_rss_bytes": peak, "training_peak_rss_bytes": training_peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint to fine-tune (GGUF, HF dir)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="windows per optimizer step")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help="which configurations (names)")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import environment, git_sha, load_average, slug

    with tempfile.TemporaryDirectory() as tmp:
        data = write_chat_set(Path(tmp) / "chat.jsonl", conversations=400)
        runs = []
        for r in range(args.repeats):
            order = args.configs if r % 2 == 0 else list(reversed(args.configs))
            for name in order:
                row = run_config(name, CONFIGS[name], args.model, data, args)
                print(f"{name}: {row['tokens_per_s']:.0f} tok/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB "
                      f"(training {row['training_peak_rss_bytes'] / 2**30:.2f} GiB), "
                      f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}", flush=True)
                runs.append(row)
    rows = []
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        rows.append({"config": name, "flags": CONFIGS[name],
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                     "tokens_per_s_range": [min(r["tokens_per_s"] for r in mine),
                                            max(r["tokens_per_s"] for r in mine)],
                     "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in mine),
                     "training_peak_rss_bytes": statistics.median(r["training_peak_rss_bytes"] for r in mine),
                     "losses": mine[0]["losses"]})
    env = environment("cpu")
    record = {"benchmark": "finetune", "git_sha": git_sha(), "environment": env,
              "load_average_after": load_average(),
              "setup": {"model": Path(args.model).name, "seq_len": args.seq_len, "batch": args.batch,
                        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                        "data": "400 generated arithmetic chat conversations, loss on assistant replies only"},
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"finetune-{slug(env['device'])}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
