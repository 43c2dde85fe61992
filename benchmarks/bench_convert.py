"""Meta -> HF conversion: wall time and peak RSS of checkpoints_convert.meta_to_hf next to transformers' own
``convert_llama_weights_to_hf.py``, on the same synthetic Meta checkpoint, in one run.

    python benchmarks/bench_convert.py                                    # ~1.8 GB bf16, 2 model-parallel ranks
    python benchmarks/bench_convert.py --layers 4 --hidden 1024           # smaller
    python benchmarks/bench_convert.py --hf-script path/to/convert_llama_weights_to_hf.py

Each converter runs in a fresh interpreter; its peak is the child's own VmHWM (from /proc/self/status, not
ru_maxrss, which inherits the parent's peak) minus its VmRSS after the imports. The bound that
checkpoints_convert promises is largest input shard + largest output shard (+10% slack in the tests).

transformers does not ship its conversion scripts in the wheel: the script is looked up in the installed
package, then taken from ``--hf-script`` (a copy from a transformers source checkout). Its command line is
run as documented (Llama 2 layout, ``--model_size 13B``, whose NUM_SHARDS is 2, a tokenizer.model in the
input); when that fails, the failure is recorded and its weight conversion, ``write_model``, is called
directly with the vocabulary size, which is what its CLI would have passed. The two outputs are compared
tensor by tensor. Random weights: time and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = "convert_llama_weights_to_hf.py"
MODEL_SIZE = "13B"  # NUM_SHARDS["13B"] == 2 in the transformers script: matches --shards 2
LLAMA_VERSION = "2"  # Llama 2 layout: embedding split on dim 1, vocab_size -1 in params.json

CHILD = textwrap.dedent("""
    import json, sys, time


    def status_bytes(field):  # this process's own counters (Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    if mode == "ours":
        import torch
        import checkpoints_convert
        import llama_core

        run = lambda: checkpoints_convert.meta_to_hf(spec["input"], spec["output"], progress=False,
                                                     max_shard_size=spec["max_shard_size"])
    else:
        import importlib.util

        import tokenizers
        import torch
        import transformers
        from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer,
                                  PreTrainedTokenizerFast)
        from transformers.convert_slow_tokenizer import TikTokenConverter

        loader = importlib.util.spec_from_file_location("convert_llama_weights_to_hf", spec["script"])
        script = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(script)
        if mode == "transformers-cli":
            sys.argv = [spec["script"], "--input_dir", spec["input"], "--model_size", spec["model_size"],
                        "--llama_version", spec["llama_version"], "--output_dir", spec["output"]]
            run = script.main
        else:
            run = lambda: script.write_model(model_path=spec["output"], input_base_path=spec["input"],
                                             model_size=spec["model_size"], llama_version=spec["llama_version"],
                                             vocab_size=spec["vocab_size"])
    baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM"), "wall_s": wall}))
""")


def build_meta(directory: Path, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, shards: int,
               dtype: torch.dtype, seed: int = 0) -> dict:
    """A Llama-2-layout Meta checkpoint of random weights: params.json + consolidated.NN.pth, one per rank.

    Column-parallel wq/wk/wv/w1/w3/output are split on dim 0, row-parallel wo/w2 and the embedding on
    dim 1, norms replicated; each rank also holds ``rope.freqs`` as Meta's Llama 2 files do."""
    head_dim = hidden // heads
    ffn = 256 * ((int(8 * hidden / 3) + 255) // 256)  # Meta's sizing with multiple_of=256
    params = {"dim": hidden, "multiple_of": 256, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
              "norm_eps": 1e-05, "vocab_size": -1}
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    norms = {f"layers.{i}.{n}.weight": (1 + 0.5 * torch.rand(hidden, generator=gen)).to(dtype)
             for i in range(layers) for n in ("attention_norm", "ffn_norm")}
    norms["norm.weight"] = (1 + 0.5 * torch.rand(hidden, generator=gen)).to(dtype)
    freqs = (1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(dtype)
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params) + "\n")
    for rank in range(shards):
        state = {"tok_embeddings.weight": rand(vocab, hidden // shards)}
        for i in range(layers):
            p = f"layers.{i}."
            state |= {p + "attention.wq.weight": rand(hidden // shards, hidden),
                      p + "attention.wk.weight": rand(kv_heads * head_dim // shards, hidden),
                      p + "attention.wv.weight": rand(kv_heads * head_dim // shards, hidden),
                      p + "attention.wo.weight": rand(hidden, hidden // shards),
                      p + "feed_forward.w1.weight": rand(ffn // shards, hidden),
                      p + "feed_forward.w2.weight": rand(hidden, ffn // shards),
                      p + "feed_forward.w3.weight": rand(ffn // shards, hidden)}
        state |= norms | {"output.weight": rand(vocab // shards, hidden), "rope.freqs": freqs}
        torch.save(state, directory / f"consolidated.{rank:02d}.pth")
        del state
    return {"intermediate_size": ffn, "head_dim": head_dim}


def find_script(explicit: str | None) -> tuple[Path | None, str]:
    """The transformers converter and where it came from, or None and why it is missing."""
    import transformers

    installed = Path(transformers.__file__).parent / "models" / "llama" / SCRIPT
    if installed.is_file():
        return installed, "installed transformers package"
    missing = (f"transformers {transformers.__version__} does not ship models/llama/{SCRIPT}: its wheel "
               "(dist-info RECORD) lists no models/*/convert_* scripts; they exist only in the source repository")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--hf-script {path} not found")
        return path, f"--hf-script (a copy of the file from the transformers source repository); {missing}"
    return None, missing + "; pass --hf-script PATH to include it"


def find_tokenizer(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    assets = Path(os.environ.get("LLAMA_CORE_ASSETS", REPO.parent / "shared" / "assets"))
    path = assets / "llama2-tokenizer" / "tokenizer.model"
    return path if path.is_file() else None


def run_child(mode: str, spec: dict, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(spec)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        chain = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]  # cause first
        return {"ok": False, "error": lines[-1] if lines else f"exit code {proc.returncode}", "exceptions": chain}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "wall_s": result["wall_s"], "baseline_bytes": result["baseline"],
            "peak_minus_baseline_bytes": result["peak"] - result["baseline"]}


def weight_files(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def sizes(files: list[Path]) -> dict:
    return {"files": len(files), "total_bytes": sum(f.stat().st_size for f in files),
            "largest_bytes": max((f.stat().st_size for f in files), default=0)}


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison of two HF safetensors directories (names, dtypes, values)."""
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        out = {}
        for f in weight_files(directory, "*.safetensors"):
            with safe_open(f, framework="pt") as g:
                out |= {name: f for name in g.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return out

    a, b = index(ours), index(theirs)
    differing = []
    for name in sorted(a.keys() & b.keys()):
        with safe_open(a[name], framework="pt") as fa, safe_open(b[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                differing.append(name)
    return {"tensors_compared": len(a.keys() & b.keys()), "only_ours": sorted(a.keys() - b.keys()),
            "only_transformers": sorted(b.keys() - a.keys()), "differing": differing,
            "bit_identical": not differing and a.keys() == b.keys()}


def git_sha() -> str:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or os.environ.get("LLAMA_CORE_GIT_SHA", "unknown")
    return sha + (" (working tree has uncommitted changes)" if git("status", "--porcelain") else "")


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 128")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads / 2")
    parser.add_argument("--vocab", type=int, default=32000, help="32000 matches the Llama 2 tokenizer.model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default="500MB", help="meta_to_hf's output shard limit")
    parser.add_argument("--hf-script", default=None, help=f"path to transformers' {SCRIPT}")
    parser.add_argument("--hf-script-source", default=None,
                        help="free text recorded with the result: where the --hf-script copy came from")
    parser.add_argument("--tokenizer", default=None,
                        help="Llama 2 sentencepiece tokenizer.model for the transformers CLI "
                             "(default: $LLAMA_CORE_ASSETS/llama2-tokenizer/tokenizer.model)")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per converter run")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write the JSON record")
    args = parser.parse_args()
    shards = 2
    heads = args.heads or args.hidden // 128
    kv_heads = args.kv_heads or max(heads // 2, shards)
    dtype = getattr(torch, args.dtype)
    import transformers

    script, script_origin = find_script(args.hf_script)
    tokenizer = find_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        meta = work / "meta"
        shape = build_meta(meta, args.layers, args.hidden, heads, kv_heads, args.vocab, shards, dtype)
        if tokenizer is not None:  # the transformers CLI reads it from the input directory
            shutil.copy2(tokenizer, meta / "tokenizer.model")
        inputs = sizes(weight_files(meta, "consolidated.*.pth"))
        for f in weight_files(meta, "consolidated.*.pth"):  # warm the page cache: both runs read it cached
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

        results: dict[str, dict] = {}
        spec = {"input": str(meta), "output": str(work / "ours"), "max_shard_size": args.max_shard_size}
        results["checkpoints_convert.meta_to_hf"] = run_child("ours", spec, args.timeout)
        transformers_notes: dict = {"script_origin": script_origin}
        if script is not None:
            transformers_notes["script"] = str(script)
            transformers_notes["script_sha256"] = hashlib.sha256(script.read_bytes()).hexdigest()
            if args.hf_script_source:
                transformers_notes["script_source"] = args.hf_script_source
            spec = {"input": str(meta), "output": str(work / "theirs-cli"), "script": str(script),
                    "model_size": MODEL_SIZE, "llama_version": LLAMA_VERSION, "vocab_size": args.vocab}
            cli = (run_child("transformers-cli", spec, args.timeout) if tokenizer is not None else
                   {"ok": False, "error": "no Llama 2 tokenizer.model found (--tokenizer); the CLI needs one"})
            transformers_notes["cli"] = {"command": f"{SCRIPT} --input_dir META --model_size {MODEL_SIZE} "
                                                    f"--llama_version {LLAMA_VERSION} --output_dir OUT", **cli}
            out_theirs = work / "theirs-cli"
            if not cli["ok"]:
                spec["output"] = str(work / "theirs")
                out_theirs = work / "theirs"
                transformers_notes["measured"] = (f"write_model(model_size={MODEL_SIZE!r}, llama_version="
                                                  f"{LLAMA_VERSION!r}, vocab_size={args.vocab}) called directly "
                                                  "(weights only), because the CLI failed")
                results["transformers convert_llama_weights_to_hf"] = run_child("transformers-write-model", spec,
                                                                                args.timeout)
            else:
                transformers_notes["measured"] = "the CLI (tokenizer conversion included)"
                results["transformers convert_llama_weights_to_hf"] = cli
        else:
            out_theirs = None
            results["transformers convert_llama_weights_to_hf"] = {"ok": False, "error": script_origin}

        outputs = {"checkpoints_convert.meta_to_hf": work / "ours",
                   "transformers convert_llama_weights_to_hf": out_theirs}
        for name, result in results.items():
            if result["ok"]:
                out = sizes(weight_files(outputs[name], "*.safetensors"))
                bound = inputs["largest_bytes"] + out["largest_bytes"]
                result |= {"output": out, "bound_bytes": bound,
                           "peak_over_bound": result["peak_minus_baseline_bytes"] / bound}
        parity = None
        if all(r["ok"] for r in results.values()):
            parity = compare_outputs(work / "ours", out_theirs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    params = (2 * args.vocab * args.hidden + args.layers * (
        2 * args.hidden * args.hidden + 2 * kv_heads * shape["head_dim"] * args.hidden
        + 3 * args.hidden * shape["intermediate_size"] + 2 * args.hidden) + args.hidden)
    device = platform.processor() or platform.machine() or "cpu"
    settings = {"layers": args.layers, "hidden": args.hidden, "heads": heads, "kv_heads": kv_heads,
                "intermediate_size": shape["intermediate_size"], "vocab": args.vocab, "model_parallel_shards": shards,
                "dtype": args.dtype, "max_shard_size": args.max_shard_size, "params": params,
                "transformers_model_size": MODEL_SIZE, "transformers_llama_version": LLAMA_VERSION,
                "page_cache": "input files read once before both runs"}
    record = {"device": f"{device} ({os.cpu_count()} CPUs)", "torch": torch.__version__,
              "transformers": transformers.__version__, "git_sha": git_sha(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": settings, "input": inputs, "results": results, "transformers_converter": transformers_notes,
              "parity": parity}

    print(f"Meta -> HF, {params / 1e6:.0f}M params {args.dtype}, {shards} ranks, on {record['device']}")
    print(f"input: {inputs['files']} files, {mb(inputs['total_bytes'])}, largest {mb(inputs['largest_bytes'])}")
    print("peak RSS = child VmHWM - VmRSS after imports; bound = largest input shard + largest output shard "
          "(its own output, for either converter)")
    print(f"{'converter':42s} {'wall s':>8s} {'peak RSS':>10s} {'bound':>10s} {'peak/bound':>10s} {'out files':>9s} "
          f"{'largest out':>11s}")
    for name, r in results.items():
        if r["ok"]:
            print(f"{name:42s} {r['wall_s']:8.1f} {mb(r['peak_minus_baseline_bytes']):>10s} "
                  f"{mb(r['bound_bytes']):>10s} {r['peak_over_bound']:10.2f} {r['output']['files']:9d} "
                  f"{mb(r['output']['largest_bytes']):>11s}")
        else:
            print(f"{name:42s} did not run: {r['error']}")
    if "cli" in transformers_notes and not transformers_notes["cli"]["ok"]:
        print("transformers CLI failed: " + " <- ".join(reversed(transformers_notes["cli"].get("exceptions") or
                                                               [transformers_notes["cli"]["error"]])))
        print(f"  measured instead: {transformers_notes['measured']}")
    if parity is not None:
        print(f"outputs: {parity['tensors_compared']} tensors compared, bit-identical: {parity['bit_identical']}")
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / "convert-cpu.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"recorded {out}")


if __name__ == "__main__":
    main()
