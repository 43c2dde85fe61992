"""GGML dequantisation, gguf's numpy code vs the torch one in ``checkpoints_convert.gguf_quants``, per type at
real sizes, and quantisation (F16, BF16, Q8_0); the numbers behind ``impl="auto"``'s choice per type.

    python benchmarks/bench_gguf_dequant.py            # a 4096 x 4096 weight and a 49152 x 576 embedding
                                                       # (49152 x 768 for the K-quants' 256-element blocks)
    python benchmarks/bench_gguf_dequant.py --quick    # a 1024 x 1024 weight, 3 repeats

Both sides run through ``dequantize(..., impl=...)``: the same chunking and output tensor, so the timings
differ only by the block arithmetic (gguf's numpy on one thread, torch's ops on ``torch.get_num_threads()``).
The data is random bytes with finite fp16 scales (the arithmetic does not depend on the values). Each
round times every case once, both implementations in alternating order; the table gives median times, MB/s
of float32 output (of float32 input for quantize) and the median of the per-round ratios, so that load
from other processes (this machine is shared) hits both sides alike and a burst of it spoils a round, not a
case. The load average and the best times are recorded with the rows, in
benchmarks/results/gguf-dequant-<device>.json (device, versions, git sha). A script, never a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_data(gguf, name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """What GGUFReader hands out: typed F32/F16 elements, else the uint8 block bytes, scales finite."""
    if name in ("F32", "F16"):
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float32 if name == "F32" else np.float16)
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    data = rng.integers(0, 256, (shape[0], shape[1] // block_size * type_size), dtype=np.uint8)
    if name == "BF16":
        data.view(np.uint16)[:] = (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    blocks = data.reshape(-1, type_size)
    for offset in FP16_FIELDS.get(name, ()):
        scale = (rng.standard_normal(len(blocks), dtype=np.float32) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return data


def interleaved(cases: dict[tuple, dict[str, Callable[[], object]]], repeats: int) -> dict[tuple, dict]:
    """Seconds per call of each case's implementations: one warm-up call each, then ``repeats`` rounds, each
    round going once through every case, both implementations in alternating order. A burst of load from
    another process then spoils one round of many cases rather than every round of one."""
    for fns in cases.values():
        for fn in fns.values():
            fn()
    times = {case: {impl: [] for impl in fns} for case, fns in cases.items()}
    for r in range(repeats):
        for case, fns in cases.items():
            for impl in (list(fns) if r % 2 == 0 else list(reversed(fns))):
                start = time.perf_counter()
                fns[impl]()
                times[case][impl].append(time.perf_counter() - start)
    return times


def row(op: str, ggml_type: str, shape: tuple[int, int], times: dict[str, list[float]], nbytes: int,
        auto: str | None) -> dict:
    ratios = [n / t for n, t in zip(times["numpy"], times["torch"], strict=True)]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"op": op, "ggml_type": ggml_type, "shape": list(shape), "repeats": len(ratios),
            "numpy_ms": round(ms["numpy"], 3), "torch_ms": round(ms["torch"], 3),
            "numpy_mb_s": round(nbytes / ms["numpy"] / 1e3, 1), "torch_mb_s": round(nbytes / ms["torch"] / 1e3, 1),
            "numpy_best_ms": round(min(times["numpy"]) * 1e3, 3), "torch_best_ms": round(min(times["torch"]) * 1e3, 3),
            "torch_speedup": round(statistics.median(ratios), 3), "faster": "torch" if statistics.median(ratios) > 1
            else "numpy", "auto": auto}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--repeats", type=int, help="rounds per measurement (default 7, --quick 3)")
    parser.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = [(1024, 1024)] if args.quick else [(4096, 4096), (49152, 576)]

    sys.path.insert(0, str(REPO))
    from checkpoints_convert import gguf_quants
    from llama_core.bench.environment import device_name, environment, slug
    from llama_core.model_io.gguf_file import import_gguf

    gguf = import_gguf()
    env = environment("cpu")
    meta = {k: env[k] for k in ("device", "cpu_count", "torch_threads", "torch", "python", "git_sha", "date")}
    meta.update(numpy=np.__version__, gguf=_gguf_version(), load_avg_1m_start=round(os.getloadavg()[0], 2))
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'op':10s} {'type':5s} {'shape':>12s} {'numpy ms':>9s} {'torch ms':>9s} {'numpy MB/s':>11s} "
          f"{'torch MB/s':>11s} {'torch/numpy':>11s}  auto")
    for base in shapes:
        cases, info = {}, {}
        for name in args.types:
            qtype = gguf.GGMLQuantizationType[name]
            block_size = gguf.GGML_QUANT_SIZES[qtype][0]
            shape = (base[0], -(-base[1] // block_size) * block_size)  # K-quants: 576 -> 768 wide
            data = random_data(gguf, name, shape, rng)
            a, b = (gguf_quants.dequantize(data, qtype, shape, impl=i) for i in ("torch", "numpy"))
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name}: torch != numpy"
            del a, b
            cases["dequantize", name] = {i: partial(gguf_quants.dequantize, data, qtype, shape, impl=i)
                                         for i in ("numpy", "torch")}
            info["dequantize", name] = (shape, gguf_quants._DEQUANT[name][1])
        x = torch.randn(base)
        for name in ("F16", "BF16", "Q8_0"):  # what GGUFWriter takes (F32 is the data itself)
            qtype = gguf.GGMLQuantizationType[name]
            cases["quantize", name] = {i: partial(gguf_quants.quantize, x, qtype, impl=i) for i in ("numpy", "torch")}
            info["quantize", name] = (base, gguf_quants._QUANTIZE[name])
        for (op, name), times in interleaved(cases, repeats).items():
            shape, auto = info[op, name]
            rows.append(row(op, name, shape, times, shape[0] * shape[1] * 4, auto))  # fp32 bytes out / in
            show(rows[-1])
        del cases
    meta["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    rows = [dict(meta, **r) for r in rows]

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gguf-dequant-{slug(device_name('cpu'))}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"load average (1 min) {meta['load_avg_1m_start']} -> {meta['load_avg_1m_end']} on "
          f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads; wrote {out}")
    return 0


def show(r: dict) -> None:
    shape = "x".join(map(str, r["shape"]))
    flag = "" if r["auto"] in (None, r["faster"]) else f"  (measured faster: {r['faster']})"
    print(f"{r['op']:10s} {r['ggml_type']:5s} {shape:>12s} {r['numpy_ms']:9.2f} {r['torch_ms']:9.2f} "
          f"{r['numpy_mb_s']:11.0f} {r['torch_mb_s']:11.0f} {r['torch_speedup']:10.2f}x  {r['auto'] or '-'}{flag}",
          flush=True)


def _gguf_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
