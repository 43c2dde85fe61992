"""Checkpoint load time and peak RSS, llama_core vs transformers ``from_pretrained`` of the same checkpoint
(and llama.cpp's ``Llama(model_path=...)`` of the GGUF it is measured on), each in a fresh subprocess so its
resident-set numbers belong to that load alone.

Reported per side: the load's wall time, peak RSS, and the peak RSS *added* by the load over the
process after its imports (transformers' import alone is several hundred MB, which is not the loader's
doing). A first one-token forward follows, because a memory-mapped loader may defer reading weights
until they are used (llama.cpp maps its file and reads pages as the first eval touches them); its peak is
reported too. On a GPU the CUDA allocator's peak is recorded as well.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .prefill import Progress
from .setup import BenchSettings
from .timing import spread

_SCRIPT = r"""
import json, sys, time
side, path, dtype_name, device, threads = sys.argv[1:6]
import torch
from llama_core.bench.timing import current_rss, peak_rss, reset_peak_rss, sync
torch.set_num_threads(int(threads))
dtype = getattr(torch, dtype_name)
forward = lambda: model(torch.ones(1, 1, dtype=torch.long, device=device))
if side == "transformers":
    import transformers
    transformers.logging.set_verbosity_error()
    from llama_core.bench.setup import transformers_from_pretrained
    load = lambda: transformers_from_pretrained(path, dtype, device)
elif side == "llama_cpp":
    import llama_cpp
    load = lambda: llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=int(threads),
                                   n_threads_batch=int(threads), verbose=False)
    forward = lambda: model.eval([1])
else:
    from llama_core import LlamaForCausalLM
    load = lambda: LlamaForCausalLM.from_pretrained(path, dtype=dtype, device=device)
base = reset_peak_rss()
t0 = time.perf_counter()
model = load()
sync(device)
load_s = time.perf_counter() - t0
peak_load = peak_rss()
with torch.inference_mode():
    forward()
sync(device)
result = dict(load_s=load_s, base_rss=base, peak_rss=peak_load, peak_rss_after_forward=peak_rss(),
              cuda_peak=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None)
print("RESULT " + json.dumps(result))
"""

SIDES = ("llama_core", "transformers", "llama_cpp")


def load_rounds(settings: BenchSettings) -> int:
    """Interleaved rounds of fresh-process loads: one for --quick (no verdict then: no spread), else three."""
    return 1 if settings.quick else 3


def _run(side: str, checkpoint: Path, settings: BenchSettings) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # importable even when run from a source checkout
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, side, str(checkpoint), settings.dtype, settings.device,
                           str(torch.get_num_threads())], capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load benchmark ({side}) failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def bench_load(checkpoint: Path, settings: BenchSettings, progress: Progress,
               llama_cpp_file: Path | None = None) -> list[dict[str, Any]]:
    """Each side loads what it is benchmarked on: ``checkpoint`` (llama_core, transformers), ``llama_cpp_file``
    (llama.cpp; None: not measured)."""
    files = {"llama_core": checkpoint, "transformers": checkpoint if settings.transformers else None,
             "llama_cpp": llama_cpp_file}
    sides = [side for side in SIDES if files[side] is not None]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    repeats = load_rounds(settings)
    for r in range(repeats):  # interleaved; the files were just written or read, so they are in the page cache
        for side in sides if r % 2 == 0 else sides[::-1]:
            progress(f"load {side} ({r + 1}/{repeats})")
            runs[side].append(_run(side, files[side], settings))
    rows = []
    for side, results in runs.items():
        def med(key: str, results: list[dict[str, Any]] = results) -> Any:
            values = [x[key] for x in results if x[key] is not None]
            return statistics.median(values) if values else None

        base, peak = med("base_rss"), med("peak_rss")
        mode = "Llama(model_path)" if side == "llama_cpp" else "from_pretrained"
        rows.append({"bench": "load", "impl": side, "mode": mode, "file": files[side].name, "median_s": med("load_s"),
                     "peak_rss_bytes": peak, "added_rss_bytes": None if base is None else peak - base,
                     "peak_rss_after_forward_bytes": med("peak_rss_after_forward"),
                     "cuda_peak_bytes": med("cuda_peak"), "repeats": repeats})
    if "transformers" in runs:
        ours, theirs = rows[:2]
        ours["vs_transformers"] = theirs["median_s"] / ours["median_s"]
        if ours["added_rss_bytes"] and theirs["added_rss_bytes"]:
            ours["rss_ratio_vs_transformers"] = ours["added_rss_bytes"] / theirs["added_rss_bytes"]
            ours["rss_ratio_vs_transformers_spread"] = spread(_added_ratios(runs["llama_core"], runs["transformers"]))
    return rows


def _added_ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    """Added peak RSS of ours over theirs, per interleaved round: their [min, max] is the RSS ratio's noise."""
    def added(run: dict[str, Any]) -> int | None:
        return None if run["peak_rss"] is None or run["base_rss"] is None else run["peak_rss"] - run["base_rss"]

    pairs = [(added(a), added(b)) for a, b in zip(ours, theirs, strict=True)]
    return [a / b for a, b in pairs if a is not None and b]
