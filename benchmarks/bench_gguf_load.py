"""Loading a real GGUF (SmolLM2-135M-Instruct, Q4_1 + Q8_0) into a PyTorch model: llama_core's
``from_pretrained("model.gguf")`` next to transformers' ``from_pretrained(dir, gguf_file=...)``, same file.

Each load runs in a fresh interpreter (the libraries imported before the clock starts), alternating between
the two libraries for ``--repeats`` rounds; reported per library: median wall time of the load, median peak
RSS added by it (VmHWM over the RSS after imports), and the max |logit diff| between the two models on one
prompt. Writes benchmarks/results/gguf-load-<device>.json (device, versions, git sha). A script, never a
timed assertion.

    python benchmarks/bench_gguf_load.py [--gguf PATH] [--dtype float32|bfloat16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = Path(os.environ.get("LLAMA_CORE_ASSETS", REPO.parent / "shared" / "assets")) / "smollm2" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    which, path, dtype, out = sys.argv[1:5]
    dtype = getattr(torch, dtype)
    if which == "llama_core":
        import gguf, checkpoints_convert.gguf, llama_core
        with torch.device("meta"):  # what building any model imports (torch._dynamo): code, not loading
            llama_core.LlamaForCausalLM(llama_core.LlamaConfig.from_preset("tiny"))
        load = lambda: llama_core.LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        import gguf, transformers
        from pathlib import Path
        transformers.logging.set_verbosity_error()
        p = Path(path)
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    grown = status_bytes("VmHWM") - baseline
    with torch.no_grad():
        logits = model(torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]])).logits
    torch.save(logits, out)
    print(json.dumps({"seconds": seconds, "grown_bytes": grown,
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.gguf.is_file():
        print(f"bench_gguf_load: {args.gguf} not found (set LLAMA_CORE_ASSETS or pass --gguf)")
        return 1
    sys.path.insert(0, str(REPO))
    import torch

    from llama_core.bench.environment import device_name, environment, slug

    runs: dict[str, list[dict]] = {"llama_core": [], "transformers": []}
    logits = {}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for which in order:
            out = RESULTS / f".gguf-load-{which}.pt"
            proc = subprocess.run([sys.executable, "-c", CHILD, which, str(args.gguf), args.dtype, str(out)],
                                  cwd=REPO, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return 1
            runs[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            logits[which] = torch.load(out, weights_only=True)
            out.unlink()
            print(f"round {r + 1} {which:12s} {runs[which][-1]['seconds']:.2f} s, "
                  f"+{runs[which][-1]['grown_bytes'] / 1e6:.0f} MB")
    summary = {}
    for which, rs in runs.items():
        summary[which] = {"seconds_median": statistics.median(x["seconds"] for x in rs),
                          "grown_mb_median": statistics.median(x["grown_bytes"] for x in rs) / 1e6,
                          "model_mb": rs[0]["model_bytes"] / 1e6, "runs": rs}
    ratio = summary["transformers"]["seconds_median"] / summary["llama_core"]["seconds_median"]
    diff = float((logits["llama_core"].float() - logits["transformers"].float()).abs().max())
    for which, s in summary.items():
        print(f"{which:12s} load {s['seconds_median']:.2f} s  peak +{s['grown_mb_median']:.0f} MB "
              f"({s['grown_mb_median'] / s['model_mb']:.2f}x the {s['model_mb']:.0f} MB model)")
    print(f"llama_core loads {ratio:.2f}x faster; max |logit diff| {diff:.3g}")
    env = environment("cpu")
    record = {"benchmark": "gguf_load", "file": args.gguf.name, "dtype": args.dtype, "repeats": args.repeats,
              **{k: env[k] for k in ("device", "torch", "transformers", "git_sha", "date") if k in env},
              "gguf": __import__("gguf").__version__ if hasattr(__import__("gguf"), "__version__") else None,
              "speedup_vs_transformers": ratio, "max_abs_logit_diff": diff, "results": summary}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"gguf-load-{slug(device_name('cpu'))}-{args.dtype}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
