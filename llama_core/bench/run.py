"""One benchmark run: every model's (preset or --model) prefill, decode and load benchmarks side by side with
transformers and llama.cpp, the kernel microbenchmarks on a GPU, and the record that holds them."""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model_io.gguf_file import find_gguf
from . import llamacpp
from .decode import bench_decode
from .environment import environment, load_average
from .kernel_registry import run_kernel_benchmarks
from .loading import bench_load
from .prefill import bench_prefill
from .report import Record
from .setup import BenchSettings, ModelPair, build_pair
from .targets import evaluate
from .timing import copy_bandwidth

logger = logging.getLogger(__name__)


def run_bench(settings: list[BenchSettings], kernels: bool | None = None, quick: bool = False,
              show_progress: bool | None = None) -> Record:
    """Run the benchmarks and return the record. ``kernels``: run the op microbenchmarks (default: on
    CUDA only; on a CPU the Triton kernels are not what runs). ``show_progress``: a tqdm bar on stderr
    (None: only when stderr is a terminal)."""
    if not settings:
        raise ValueError("nothing to benchmark: no settings given")
    device = settings[0].device
    if any(s.device != device for s in settings):
        raise ValueError("all settings of one run must use the same device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    kernels = torch.device(device).type == "cuda" if kernels is None else kernels
    phases = sum(2 + bool(s.prompt_lens) + bool(s.batch_sizes) + s.load for s in settings) + 1 + kernels
    bar = tqdm(total=phases, desc="bench", disable=None if show_progress is None else not show_progress,
               leave=False, dynamic_ncols=True)

    def note(message: str) -> None:
        bar.set_postfix_str(message, refresh=True)
        logger.info(message)

    record: Record = {"environment": environment(device),
                      "settings": {"quick": quick, "kernels": kernels, "device": device}, "models": []}
    note("copy bandwidth")
    # Bigger than any cache, small enough for a 2-core CI box: 256 MB (CPU) or 1 GiB (GPU).
    nbytes = 2**30 if torch.device(device).type == "cuda" else 2**28
    record["copy_bandwidth_gb_s"] = copy_bandwidth(device, nbytes) / 1e9
    bar.update()
    workdir = Path(tempfile.mkdtemp(prefix="llama-core-bench-"))
    try:
        for s in settings:
            record["models"].append(_bench_model(s, record["copy_bandwidth_gb_s"] * 1e9, workdir, note, bar))
            record["models"][-1]["targets"] = evaluate(record["models"][-1], torch.device(device).type)
        if kernels:
            note("kernels")
            record["kernels"] = run_kernel_benchmarks(device, quick, progress=note)
            bar.update()
        record["load_average_end"] = load_average()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        bar.close()
    return record


def _bench_model(s: BenchSettings, copy_bytes_per_s: float, workdir: Path, note, bar) -> dict[str, Any]:
    note(f"{s.name}: loading into llama_core and transformers" + (" and llama.cpp" if s.llama_cpp else ""))
    pair = build_pair(s, workdir)
    bar.update()
    model: dict[str, Any] = {"settings": s.to_dict(), "params": pair.ours.num_parameters(),
                             "sanity": pair.sanity, "weights": _weights(s, pair)}
    model["llama_cpp"] = ({"version": llamacpp.version(), "files": [r.info() for r in pair.llama_cpp.values()]}
                          if pair.llama_cpp else {"skipped": pair.llama_cpp_skipped})
    llama_cpp_file = next((r.path for mode, r in pair.llama_cpp.items() if mode != llamacpp.Q8_0), None)
    try:
        if s.prompt_lens:
            model["prefill"] = bench_prefill(pair, s, note)
            bar.update()
        if s.batch_sizes:
            model["decode"] = bench_decode(pair, s, copy_bytes_per_s, note)
            bar.update()
    finally:
        pair.close()
    checkpoint, owned = pair.checkpoint, pair.owned
    del pair  # free every model before the load subprocesses need the memory
    gc.collect()
    if torch.device(s.device).type == "cuda":
        torch.cuda.empty_cache()
    if s.load:
        model["load"] = bench_load(checkpoint, s, note, llama_cpp_file)
        bar.update()
    if owned:  # a preset's temporary checkpoint; never the user's --model
        shutil.rmtree(checkpoint, ignore_errors=True)
    bar.update()
    return model


def _weights(s: BenchSettings, pair: ModelPair) -> dict[str, Any]:
    """What the record says the weights are: random-init preset, or the --model file and its format."""
    if s.model is None:
        return {"kind": "random", "preset": s.preset, "seed": s.seed}
    gguf = find_gguf(pair.checkpoint)
    out = {"kind": "checkpoint", "name": s.name, "path": str(pair.checkpoint),
           "format": "gguf" if gguf is not None else "hf"}
    if gguf is not None:
        out["gguf_file_type"] = llamacpp.gguf_file_type(gguf)
    return out
