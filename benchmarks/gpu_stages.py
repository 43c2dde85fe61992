"""The stages of benchmarks/gpu_check.py: each measures one thing and hands every row to ``emit`` as soon as it
exists, so that a stage stopped by the time budget still leaves what it measured.

Each stage runs in its own process (gpu_check.py starts it), which isolates its CUDA memory, compile caches and
any crash from the others. ``dry`` runs the same code on a CPU at tiny shapes (Triton's interpreter for the
kernels, the ``tiny`` preset, one or two repeats, no compilation): CI's proof that the plumbing works, not a
measurement. The sweeps themselves are the library's (``llama_core.bench``), shared with the bench scripts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
Row = dict[str, Any]
logger = logging.getLogger("gpu_check")

# The kernel shapes: Llama 3 8B attention (32 q / 8 kv heads of 128), 16384 tokens, hidden 4096.
ROPE_SHAPE = dict(heads=32, kv_heads=8, head_dim=128, tokens=16384)
RMS_NORM_SHAPE = dict(hidden=4096, tokens=16384)
GPU_TEST_FILES = ("tests/test_kernels_int8.py", "tests/test_kernels_rms_norm.py", "tests/test_kernels_rope.py",
                  "tests/test_kernels_model.py", "tests/test_cuda.py", "tests/test_generation.py")
# The end-to-end stages' measurements in priority order (the budget may stop a stage after any of them): what
# each target needs first, then the rest. Each compiled candidate costs a compilation (tens of seconds on a
# GPU), so each phase names only the candidates it needs; transformers' static+compile is left out for that.
E2E_PHASES: list[tuple[str, int, list[str]]] = [
    ("decode", 1, ["llama_core/eager", "llama_core/compiled", "llama_core/int8-weight-only-compiled",
                   "transformers/eager"]),
    ("prefill", 2048, ["llama_core/eager", "llama_core/compiled", "transformers/eager"]),
    ("prefill", 512, ["llama_core/eager", "transformers/eager"]),
    ("decode", 8, ["llama_core/eager", "llama_core/compiled", "transformers/eager"]),
]


@dataclass
class StageContext:
    device: str  # "cuda", or "cpu" in a dry run
    dry: bool
    emit: Callable[[Row], None]
    output: Path  # the check's output folder (the pytest stage writes its junit XML there)


def _copy_bandwidth_row(ctx: StageContext) -> Row:
    from llama_core.bench.timing import copy_bandwidth

    nbytes = 2**22 if ctx.dry else 2**31  # 2 GiB: far beyond the H100/H200's 50-60 MB of L2
    return {"kind": "copy_bandwidth", "gb_s": copy_bandwidth(ctx.device, nbytes, repeats=2 if ctx.dry else 10) / 1e9,
            "bytes": nbytes}


# ------------------------------------------------------------------------------------------------ kernels
def stage_pytest(ctx: StageContext) -> None:
    """The ``gpu``-marked tests (real shapes, exactness against the references) in a pytest subprocess."""
    junit = ctx.output / "pytest-gpu.xml"
    files = GPU_TEST_FILES[1:2] if ctx.dry else GPU_TEST_FILES  # dry: one file, all skipped without CUDA
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *files]
    # Output not captured: it streams into this stage's log (stages.log), so a run the budget stops still says
    # how far it got; the junit XML is written only at the end.
    proc = subprocess.run(cmd, cwd=REPO)
    row = {"kind": "pytest", "returncode": proc.returncode, "files": list(files)}
    row.update(junit_counts(junit))
    ctx.emit(row)


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / errors / skipped of a junit XML, and the names of the failures."""
    if not path.exists():
        return {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in cases:
        counts["tests"] += 1
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def stage_rms_norm(ctx: StageContext) -> None:
    from llama_core.bench.kernels import rms_norm_rows

    ctx.emit(_copy_bandwidth_row(ctx))  # beside the kernel, in the same process and minute
    hidden, tokens = ((64,), (8,)) if ctx.dry else ((RMS_NORM_SHAPE["hidden"],), (RMS_NORM_SHAPE["tokens"],))
    rms_norm_rows(ctx.device, "float32" if ctx.dry else "bfloat16", hidden, tokens, compile=not ctx.dry,
                  repeats=1, on_row=ctx.emit)


def stage_rope(ctx: StageContext) -> None:
    from llama_core.bench.kernels import rope_rows

    ctx.emit(_copy_bandwidth_row(ctx))
    s = dict(heads=4, kv_heads=2, head_dim=16, tokens=8) if ctx.dry else ROPE_SHAPE
    rope_rows(ctx.device, "float32" if ctx.dry else "bfloat16", (s["tokens"],), s["heads"], s["kv_heads"],
              s["head_dim"], compile=not ctx.dry, repeats=1, on_row=ctx.emit)


def stage_int8_gemm(ctx: StageContext) -> None:
    """W8A8 and weight-only int8 GEMMs against cuBLAS bf16 and torch._int_mm, with an exactness check of each
    int8 kernel against its reference at every measured shape (cheap next to the timing)."""
    from llama_core.bench.int8 import LLAMA_SHAPES, M_VALUES, int8_matmul_rows

    m_values, shapes = ((1, 20), ((64, 32),)) if ctx.dry else (M_VALUES, LLAMA_SHAPES)
    dtype = "float32" if ctx.dry else "bfloat16"
    # The M values the targets judge (<= 16 and >= 512) first, over every shape, then the rest: a stage the
    # budget stops (autotuning compiles and times each new shape's candidates) still has every target's points.
    first = [m for m in m_values if m in (1, 16, 512, 4096) or ctx.dry]
    for pass_m in (first, [m for m in m_values if m not in first]):
        for k, n in shapes:
            if pass_m is first:
                ctx.emit(_int8_exactness_row(ctx.device, dtype, first, k, n))
            if pass_m:
                int8_matmul_rows(ctx.device, pass_m, ((k, n),), dtype, repeats=1 if ctx.dry else 5, on_row=ctx.emit)


def _int8_exactness_row(device: str, dtype: str, m_values: tuple[int, ...], k: int, n: int) -> Row:
    """W8A8 without outliers must equal its reference exactly (an exact int32 sum, the same fp32 epilogue)."""
    import torch

    from kernels.int8_matmul import int8_matmul, int8_matmul_ref
    from kernels.int8_quant import quantize_rows, quantize_weight

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    w_q, w_s = quantize_weight(torch.randn(n, k, device=device, dtype=dt) * 0.02)
    exact = []
    for m in m_values:
        a_q, a_s = quantize_rows(torch.randn(m, k, device=device, dtype=dt))
        exact.append(bool(torch.equal(int8_matmul(a_q, a_s, w_q, w_s, out_dtype=dt),
                                      int8_matmul_ref(a_q, a_s, w_q, w_s, out_dtype=dt))))
    return {"kind": "int8_exact", "k": k, "n": n, "m_values": list(m_values), "exact": all(exact)}


# ------------------------------------------------------------------------------------------------ end to end
def _bench_settings(ctx: StageContext, preset: str, layers: int | None) -> Any:
    from llama_core.bench.setup import BenchSettings

    if ctx.dry:
        return BenchSettings("tiny", "cpu", "float32", decode_prompt_len=8, decode_tokens=4, repeats=1, compile=False,
                             int8=True, load=False, llama_cpp=False)
    return BenchSettings(preset, ctx.device, "bfloat16", layers=layers, decode_prompt_len=128, decode_tokens=65,
                         repeats=3, compile=True, int8=True, load=False, llama_cpp=False)


def _phases(ctx: StageContext) -> list[tuple[str, int, list[str]]]:
    """E2E_PHASES; a dry run at tiny sizes, with the eager stand-in of each compiled candidate."""
    if not ctx.dry:
        return E2E_PHASES
    return [(what, 16 if what == "prefill" else size, [c.replace("-compiled", "").replace("/compiled", "/eager")
                                                       for c in only]) for what, size, only in E2E_PHASES]


def _bench_model(ctx: StageContext, preset: str, layers: int | None) -> None:
    """Prefill and decode rows of one preset, as ``llama-core bench`` measures them (its functions, not a
    subprocess), phase by phase in E2E_PHASES' order, each phase's rows emitted as it ends."""
    import torch

    from llama_core.bench.decode import bench_decode
    from llama_core.bench.prefill import bench_prefill
    from llama_core.bench.setup import build_pair

    s = _bench_settings(ctx, preset, layers)
    copy_row = _copy_bandwidth_row(ctx)
    ctx.emit(copy_row)
    bw = copy_row["gb_s"] * 1e9
    name = {"preset": s.preset, "layers": s.layers}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        pair = build_pair(s, Path(tmp))
        ctx.emit({"kind": "e2e_model", **name, "params": pair.ours.num_parameters(), "sanity": pair.sanity})
        for what, size, only in _phases(ctx):
            if what == "prefill":
                rows = bench_prefill(pair, dataclasses.replace(s, prompt_lens=[size], only=only), logger.debug)
            else:
                rows = bench_decode(pair, dataclasses.replace(s, batch_sizes=[size], only=only), bw, logger.debug)
            for row in rows:
                ctx.emit({"kind": f"e2e_{what}", **name, **row})
        del pair
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


def stage_e2e_1b(ctx: StageContext) -> None:
    _bench_model(ctx, "llama3.2-1b", None)


def stage_e2e_8b(ctx: StageContext) -> None:
    # 8 of the 32 layers: the 8B's width (every matmul and the lm_head at its real shape) at a quarter of the
    # save/load/compile time, which the budget could not hold for the full depth. Per-step bandwidth
    # fractions and TFLOP/s carry over; absolute tok/s do not (the record says layers=8).
    _bench_model(ctx, "llama3-8b", None if ctx.dry else 8)


def stage_e2e_variants(ctx: StageContext) -> None:
    """Compiled batch-1 decode of one 1B-shaped model: Triton kernels on ("auto") vs off ("torch"), W8A8 int8
    and int8 weight-only, each as tokens/s against the bf16 kernels-on model."""
    import copy

    import torch

    from llama_core.bench.int8 import decode_tokens_per_s
    from llama_core.modeling.model import LlamaForCausalLM
    from llama_core.quant import quantize

    preset, dtype = ("tiny", torch.float32) if ctx.dry else ("llama3.2-1b", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        full = LlamaForCausalLM.from_preset(preset).to(dtype).eval()
    new_tokens, compile = (4, False) if ctx.dry else (128, True)
    base = None
    for variant in ("kernels-auto", "int8", "kernels-torch", "int8-weight-only"):  # weight-only is also in e2e_*
        if variant.startswith("kernels"):
            model = full
            model.set_kernels(variant.removeprefix("kernels-"))
        else:
            full.set_kernels("auto")
            model = quantize(copy.deepcopy(full), variant)
        tps = decode_tokens_per_s(model, new_tokens, ctx.device, compile, repeats=1 if ctx.dry else 3)
        base = tps if base is None else base
        ctx.emit({"kind": "e2e_variant", "preset": preset, "variant": variant, "compile": compile,
                  "tokens_per_s": tps, "vs_kernels_auto": tps / base})


def stage_train(ctx: StageContext) -> None:
    """A short ``llama-core train`` run (its Python entry): 1B shape, bf16, compile, Triton kernels, fused loss."""
    sys.path.insert(0, str(REPO))
    from llama_core.train import TrainConfig, train
    from tests.train_corpus import write_corpus, write_tokenizer

    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus", files=4, stories_per_file=100 if ctx.dry else 2000)
        tokenizer = write_tokenizer(root / "tokenizer", corpus)
        common = dict(data=str(corpus), tokenizer=str(tokenizer), output_dir=str(root / "run"), doc_separator="\n\n",
                      progress=False, export_hf=False, warmup_steps=1, log_every=1, kernels="auto", fused_loss=True)
        if ctx.dry:
            cfg = TrainConfig(**common, preset="tiny", seq_len=32, global_batch_size=2, micro_batch_size=2,
                              max_steps=2, dtype="float32", device="cpu")
        else:
            cfg = TrainConfig(**common, preset="llama3.2-1b", seq_len=2048, global_batch_size=8, micro_batch_size=8,
                              max_steps=6, dtype="bfloat16", compile=True, device="cuda")

        def on_step(log: Any) -> None:
            ctx.emit({"kind": "train_step", "preset": cfg.preset, "step": log.step, "loss": log.loss,
                      "tokens_per_s": log.tokens_per_s, "mfu": log.mfu, "seconds": log.seconds,
                      "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size, "compile": cfg.compile})

        train(cfg, on_step=on_step)


STAGES: dict[str, tuple[str, float, Callable[[StageContext], None]]] = {
    # name: (part, share of the budget, function), run in this order. Shares are relative weights (of ~530 s:
    # 12 -> 64 s); time a stage leaves unused passes on to the later ones. The kernel stages measure the copy
    # bandwidth themselves, in their own process and minute. The 8B shape before the 1B: the decode
    # and prefill targets are about it.
    "pytest": ("kernels", 12, stage_pytest),
    "rms_norm": ("kernels", 7, stage_rms_norm),
    "rope": ("kernels", 7, stage_rope),
    "int8_gemm": ("kernels", 18, stage_int8_gemm),
    "e2e_8b": ("e2e", 20, stage_e2e_8b),
    "e2e_1b": ("e2e", 14, stage_e2e_1b),
    "e2e_variants": ("e2e", 10, stage_e2e_variants),
    "train": ("e2e", 12, stage_train),
}


def run_stage(name: str, device: str, dry: bool, output: Path, emit: Callable[[Row], None]) -> None:
    if dry and "TRITON_INTERPRET" not in os.environ:
        raise RuntimeError("a dry run's stages need TRITON_INTERPRET=1 set before torch/triton are imported")
    STAGES[name][2](StageContext(device, dry, emit, output))
