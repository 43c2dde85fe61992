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

from ..model_io.gguf_file import find_gguf
from . import llamacpp
from .decode import bench_decode
from .environment import environment, load_average
from .kernel_registry import run_kernel_benchmarks
from .loading import bench_load
from .prefill import bench_prefill
from .progress import StageProgress, model_stages, plan
from .report import Record
from .setup import BenchSettings, ModelPair, build_pair
from .targets import evaluate
from .timing import copy_bandwidth

logger = logging.getLogger(__name__)


def run_bench(settings: list[BenchSettings], kernels: bool | None = None, quick: bool = False,
              show_progress: bool | None = None) -> Record:
    """Run the benchmarks and return the record. ``kernels``: run the op microbenchmarks (default: on
    CUDA only; on a CPU the Triton kernels are not what runs). ``show_progress``: a bar with the stage and
    time left on stderr (None: a bar on a terminal, one line per stage otherwise; False: neither)."""
    if not settings:
        raise ValueError("nothing to benchmark: no settings given")
    device = settings[0].device
    if any(s.device != device for s in settings):
        raise ValueError("all settings of one run must use the same device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    kernels = torch.device(device).type == "cuda" if kernels is None else kernels
    progress = StageProgress(plan(settings, kernels), show_progress)
    record: Record = {"environment": environment(device),
                      "settings": {"quick": quick, "kernels": kernels, "device": device}, "models": []}
    workdir = Path(tempfile.mkdtemp(prefix="llama-core-bench-"))
    try:
        progress.start("copy bandwidth")
        # Bigger than any cache, small enough for a 2-core CI box: 256 MB (CPU) or 1 GiB (GPU).
        nbytes = 2**30 if torch.device(device).type == "cuda" else 2**28
        record["copy_bandwidth_gb_s"] = copy_bandwidth(device, nbytes) / 1e9
        for s in settings:
            record["models"].append(_bench_model(s, record["copy_bandwidth_gb_s"] * 1e9, workdir, progress))
            record["models"][-1]["targets"] = evaluate(record["models"][-1], torch.device(device).type)
        if kernels:
            progress.start("kernels")
            record["kernels"] = run_kernel_benchmarks(device, quick, progress=progress.note)
        record["load_average_end"] = load_average()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        progress.close()
    return record


def _bench_model(s: BenchSettings, copy_bytes_per_s: float, workdir: Path, progress: StageProgress) -> dict[str, Any]:
    """One model's stages, named as :func:`llama_core.bench.progress.model_stages` plans them."""
    stages = iter(model_stages(s))
    progress.start(next(stages).label)
    pair = build_pair(s, workdir)
    model: dict[str, Any] = {"settings": s.to_dict(), "params": pair.ours.num_parameters(),
                             "sanity": pair.sanity, "weights": _weights(s, pair)}
    model["llama_cpp"] = ({"version": llamacpp.version(), "files": [r.info() for r in pair.llama_cpp.values()]}
                          if pair.llama_cpp else {"skipped": pair.llama_cpp_skipped})
    llama_cpp_file = next((r.path for mode, r in pair.llama_cpp.items() if mode != llamacpp.Q8_0), None)
    try:
        if s.prompt_lens:
            progress.start(next(stages).label)
            model["prefill"] = bench_prefill(pair, s, progress.note)
        if s.batch_sizes:
            model["decode"] = bench_decode(pair, s, copy_bytes_per_s, progress.note,
                                           on_batch=lambda batch: progress.start(next(stages).label))
    finally:
        pair.close()
    checkpoint, owned = pair.checkpoint, pair.owned
    del pair  # free every model before the load subprocesses need the memory
    gc.collect()
    if torch.device(s.device).type == "cuda":
        torch.cuda.empty_cache()
    if s.load:
        progress.start(next(stages).label)
        model["load"] = bench_load(checkpoint, s, progress.note, llama_cpp_file)
    if owned:  # a preset's temporary checkpoint; never the user's --model
        shutil.rmtree(checkpoint, ignore_errors=True)
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
