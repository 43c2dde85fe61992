"""Packed training windows: tokens/s and peak memory of one training step (forward, chunked loss, backward)
of a small Llama-shaped model, with document-causal attention told by restarting position_ids (the fused
path the model chooses: per-document SDPA on CPU, varlen/FlexAttention on CUDA) against the same window
given the dense ``[b, 1, t, t]`` block-diagonal mask (what training passed before).

    python benchmarks/bench_packed_attention.py                      # CUDA if available, else CPU
    python benchmarks/bench_packed_attention.py --tokens 2048 4096 --docs 4 16 --repeats 2
    python benchmarks/bench_packed_attention.py --forward-only --paths fused flex dense

``--forward-only`` times inference (no gradients), where FlexAttention also runs on CPU (compiled; its
compile happens in an untimed warm-up call of the same shape). Each measurement runs in a fresh child
process (CPU peak = the process's max RSS above the model and inputs; CUDA: max allocated), the paths
interleaved and alternating which goes first, so a shared machine's load falls on all alike. Rows go to
benchmarks/results/packed-attention-<device>[-forward].json with device, versions and git sha. A script,
never a timed assertion.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=16384)  # head_dim 32, GQA 2:1
TIMED_STEPS = 3


def _rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def document_positions(tokens: int, docs: int, seed: int = 0) -> torch.Tensor:
    """``[1, tokens]`` position ids of ``docs`` documents of random lengths (>= 1), restarting at each."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=g)[:docs - 1].add(1).sort().values.tolist()
    bounds = [0, *cuts, tokens]
    return torch.cat([torch.arange(e - s) for s, e in itertools.pairwise(bounds)])[None]


def measure_once(path: str, tokens: int, docs: int, device: str, forward_only: bool) -> dict:
    """Training steps (or forwards) in this fresh process: the fastest of ``TIMED_STEPS`` after one untimed
    step of the same shape (first-touch page faults, kernel loading, FlexAttention's compile), and the peak
    bytes above model and inputs. The fastest, not the median: on a CPU shared with other jobs, slower steps
    measure the neighbours."""
    sys.path.insert(0, str(REPO))
    from llama_core import LlamaConfig, LlamaForCausalLM
    from llama_core.modeling import document_attention as da

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(device).train(not forward_only)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model.to(dtype)
    if path == "flex":  # the model's choice, overridden: flex wherever it runs
        da.choose_backend = lambda *args: "flex"

    def step(ids: torch.Tensor, positions: torch.Tensor) -> float:
        targets = torch.roll(ids, -1, 1)
        mask = None
        if path == "dense":  # built per batch, as pack_windows used to
            mask = da.dense_document_mask(da.packed_document_ids(positions, 1))
        with torch.set_grad_enabled(not forward_only):
            out = model(ids, attention_mask=mask, position_ids=positions, shift_labels=targets,
                        num_items_in_batch=1, skip_logits=True)
            if not forward_only:
                out.loss.backward()
                model.zero_grad(set_to_none=True)
        return out.loss.item()

    ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), device=device)
    positions = document_positions(tokens, docs).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()  # the max RSS only grows: the untimed step's peak is the same as the timed ones'
    step(ids, positions)
    times = []
    for _ in range(TIMED_STEPS):
        t0 = time.perf_counter()
        loss = step(ids, positions)  # .item() inside: the device is synchronised
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "tokens": tokens, "docs": docs, "seconds": seconds, "step_seconds": times,
            "tokens_per_s": tokens / seconds,
            "peak_bytes": peak - base, "loss": loss}


def _child(args: argparse.Namespace, path: str, tokens: int, docs: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(tokens), "--docs", str(docs),
           "--device", args.device]
    if args.forward_only:
        cmd.append("--forward-only")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--docs", type=int, nargs="+", default=[4, 16], help="documents per window")
    parser.add_argument("--paths", nargs="+", default=["fused", "dense"], choices=["fused", "flex", "dense"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=["fused", "flex", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_once(args.child, args.tokens[0], args.docs[0], args.device, args.forward_only)))
        return 0

    sys.path.insert(0, str(REPO))
    from llama_core.bench.environment import environment, slug

    env = environment(args.device)
    runs = []
    for r in range(args.repeats):
        for tokens in args.tokens:
            for docs in args.docs:
                order = args.paths if r % 2 == 0 else args.paths[::-1]  # interleaved, alternating first
                for path in order:
                    run = _child(args, path, tokens, docs)
                    runs.append(run)
                    print(f"{path:5s} {tokens:5d} tokens {docs:3d} docs  {run['tokens_per_s']:9.0f} tok/s  "
                          f"peak {run['peak_bytes'] / 2**20:8.1f} MiB  loss {run['loss']:.4f}", flush=True)
    rows = [_summary(runs, tokens, docs, args.paths) for tokens in args.tokens for docs in args.docs]
    for row in rows:
        print(row)
    RESULTS.mkdir(exist_ok=True)
    suffix = "-forward" if args.forward_only else ""
    out = RESULTS / f"packed-attention-{slug(env['device'])}{suffix}.json"
    out.write_text(json.dumps({"environment": env, "model": MODEL,
                               "args": {k: v for k, v in vars(args).items() if k != "child"},
                               "summary": rows, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _summary(runs: list[dict], tokens: int, docs: int, paths: list[str]) -> dict:
    """Medians over repeats for one (tokens, docs) cell; ratios against the dense mask."""
    def median(path: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if (r["path"], r["tokens"], r["docs"]) == (path, tokens, docs))

    row: dict = {"tokens": tokens, "docs": docs}
    for path in paths:
        row[f"{path}_tokens_per_s"] = median(path, "tokens_per_s")
        row[f"{path}_peak_bytes"] = median(path, "peak_bytes")
    if "dense" in paths:
        for path in paths:
            if path != "dense":
                row[f"{path}_speedup_vs_dense"] = row[f"{path}_tokens_per_s"] / row["dense_tokens_per_s"]
                row[f"{path}_peak_vs_dense"] = row[f"{path}_peak_bytes"] / max(row["dense_peak_bytes"], 1)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
