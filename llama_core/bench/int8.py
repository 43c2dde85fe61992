"""int8 benchmarks: the GEMMs at Llama shapes against bf16 ``torch.matmul`` (cuBLAS) and ``torch._int_mm``,
and end-to-end decoding of a model in full precision vs its int8 modes.

GEMM rows (``int8_matmul_rows``), per (M, K, N) with ``x [M, K] @ W[N, K]^T``:
  ``dense_matmul``  torch.matmul in the activation dtype, bf16 on GPUs (the baseline, speedup 1.0)
  ``torch_int_mm``  torch._int_mm on pre-quantised int8 operands, int32 out: the raw int8 GEMM, no scales
                    (skipped where its backend refuses the shape, e.g. CUDA M <= 16)
  ``w8a8_gemm``     our int8 GEMM with its fused scale epilogue, on pre-quantised activations
  ``w8a8_linear``   what a W8A8 Int8Linear runs: outlier mask + per-token quantisation + the GEMM (threshold 6)
  ``w8a8_linear_t0`` the same with threshold 0: no outlier mask, the kernel without its outlier branch
  ``weight_only``   our weight-only int8 GEMM (activations stay bf16; split-K at decode sizes where chosen)
  ``w8a8_gemm_plain``, ``weight_only_plain``  the two GEMMs without split-K (at M <= 16, where split-K may be
                    chosen: kernels/int8_split_k.py)
TFLOP/s = 2 M N K / time; GB/s = bytes of the operands read and the output written / time.
On CPU the int8 rows are PyTorch's own CPU paths (``torch._int_mm``, ``_weight_int8pack_mm``), not Triton.

Decode rows (``int8_decode_rows``): greedy tokens/s of one random model, batch 1, full precision vs
``quantize(model, "int8")`` vs ``"int8-weight-only"`` (the same weights quantised in place).
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .timing import Row, time_call, time_op

logger = logging.getLogger(__name__)

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 512, 4096)
# (K, N) of Llama-3-8B's linears: attention-sized, MLP up/gate, MLP down.
LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))


def int8_matmul_rows(device: str, m_values: Sequence[int] = M_VALUES,
                     shapes: Sequence[tuple[int, int]] = LLAMA_SHAPES, dtype: str = "bfloat16", repeats: int = 5,
                     on_row: Callable[[Row], None] | None = None) -> list[Row]:
    from kernels.int8_quant import quantize_weight

    dt = getattr(torch, dtype)
    rows: list[Row] = []
    for k, n in shapes:
        w = torch.randn(n, k, device=device, dtype=dt) * 0.02
        w_q, w_s = quantize_weight(w)
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=dt)
            impls = _gemm_calls(x, w, w_q, w_s)
            base_ms = None
            for name, (call, nbytes) in impls.items():
                try:
                    call()
                except RuntimeError as e:  # e.g. torch._int_mm's shape limits on CUDA
                    logger.info("int8 bench: %s skipped at M=%d K=%d N=%d: %s", name, m, k, n, str(e)[:80])
                    continue
                ms, p20, p80 = time_op(call, device, repeats)
                base_ms = ms if name == "dense_matmul" else base_ms
                row = dict(op="int8_matmul", impl=name, m=m, k=k, n=n, dtype=dtype, ms=ms, ms_p20=p20, ms_p80=p80,
                           tflops=2 * m * n * k / ms / 1e9, gbps=nbytes / ms / 1e6,
                           speedup_vs_dense=base_ms / ms if base_ms else None)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _gemm_calls(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor,
                w_s: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, bytes it must move) for ``x [M, K]`` against ``w [N, K]`` and its int8 form."""
    from kernels import int8_split_k, int8_weight_only
    from kernels._runtime import triton_runs_on
    from kernels.int8_matmul import _int8_matmul_triton, int8_linear, int8_matmul
    from kernels.int8_quant import quantize_rows

    (m, k), n, elt = x.shape, w.shape[0], x.element_size()
    a_q, a_s = quantize_rows(x)
    x_w8a8 = m * k * elt + n * k + 4 * n + m * n * elt  # bf16 x in, int8 W, scales, bf16 out
    calls = {
        "dense_matmul": (lambda: x @ w.t(), (m * k + n * k + m * n) * elt),
        "torch_int_mm": (lambda: torch._int_mm(a_q, w_q.t()), m * k + n * k + 4 * m * n),
        "w8a8_gemm": (lambda: int8_matmul(a_q, a_s, w_q, w_s, out_dtype=x.dtype), m * k + n * k + 4 * (m + n) + m * n * elt),
        "w8a8_linear": (lambda: int8_linear(x, w_q, w_s, threshold=6.0), x_w8a8),
        # threshold 0: pure W8A8, the kernel compiled without its outlier branch (what the branch costs)
        "w8a8_linear_t0": (lambda: int8_linear(x, w_q, w_s, threshold=0.0), x_w8a8),
        "weight_only": (lambda: int8_weight_only.int8_weight_only_matmul(x, w_q, w_s), x_w8a8),
    }
    if triton_runs_on(x) and m <= int8_split_k.SPLIT_K_MAX_M:  # the plain kernels where split-K may be chosen
        calls["w8a8_gemm_plain"] = (lambda: _int8_matmul_triton(a_q, a_s.float(), w_q, w_s.float(), None, None, None,
                                                                x.dtype, split_k=1), calls["w8a8_gemm"][1])
        calls["weight_only_plain"] = (lambda: int8_weight_only._weight_only_triton(x, w_q, w_s, None, split_k=1),
                                      x_w8a8)
    return calls


def decode_tokens_per_s(model: torch.nn.Module, new_tokens: int, device: str, compile: bool,
                        repeats: int = 1) -> float:
    """Greedy batch-1 tokens/s of ``generate``, the median of ``repeats`` timed calls after a warm-up."""
    from ..generation import generate
    from ..modeling.cache import StaticCache

    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])  # never stop
    if compile:
        # one cache for every call: a CUDA-graphed step re-records when its cache buffers move
        kwargs.update(cache=StaticCache(model.config, max_batch_size=1, max_cache_len=16 + new_tokens), compile=True)
    generate(model, prompt, **{**kwargs, "max_new_tokens": min(new_tokens, 8)})  # warm-up (and compile)
    seconds = statistics.median(time_call(lambda: generate(model, prompt, **kwargs), device) for _ in range(repeats))
    return new_tokens / seconds  # eos_token_id=[]: every call produces exactly new_tokens


def int8_decode_rows(device: str, preset: str, dtype: str = "bfloat16", new_tokens: int = 64,
                     compile: bool = False, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Greedy batch-1 decode tokens/s of a random ``preset`` model: full precision, then int8, then
    weight-only int8 of the same weights (each quantised from a copy of the full model)."""
    from ..modeling.model import LlamaForCausalLM
    from ..quant import quantize

    torch.manual_seed(0)
    with torch.device(device):
        full = LlamaForCausalLM.from_preset(preset).to(getattr(torch, dtype)).eval()
    rows: list[Row] = []
    base = None
    for mode in (None, "int8", "int8-weight-only"):
        model = full if mode is None else quantize(copy.deepcopy(full), mode)
        tps = decode_tokens_per_s(model, new_tokens, device, compile)
        base = tps if mode is None else base
        row = dict(op="int8_decode", preset=preset, mode=mode or dtype, dtype=dtype, compile=compile,
                   new_tokens=new_tokens, tokens_per_s=tps, speedup_vs_full=tps / base,
                   footprint_bytes=model.get_memory_footprint())
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if mode is not None:
            del model
    return rows
