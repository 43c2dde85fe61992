"""RMSNorm and RoPE microbenchmarks: each fused Triton kernel against its eager pure-PyTorch reference and
``torch.compile`` of that reference, reported as achieved GB/s (these ops are memory-bound).

Each sweep returns rows (dicts with at least ``impl``, ``mode``, ``ms`` and ``gbps``); ``kernel_registry``
lists the sweeps ``llama-core bench`` runs. The scripts in ``benchmarks/`` (bench_rms_norm.py, bench_rope.py)
are thin CLI wrappers over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .timing import Row, time_op

logger = logging.getLogger(__name__)


def _gbps(nbytes: float, ms: float, p20: float, p80: float) -> Row:
    # The slow (p80) time gives the low (p20) bandwidth.
    return {"gbps": nbytes / ms / 1e6, "gbps_p20": nbytes / p80 / 1e6, "gbps_p80": nbytes / p20 / 1e6}


# ------------------------------------------------------------------------------------------------ RMSNorm
def rms_norm_traffic(m: int, n: int, elt: int, residual: bool, backward: bool) -> int:
    """Minimum bytes a fused kernel moves: x (+ residual in, sum out), y, weight; backward adds x or the
    sum, dy (+ d residual), dx, weight in and dW out."""
    fwd = m * n * elt * (4 if residual else 2) + n * elt
    if not backward:
        return fwd
    return fwd + m * n * elt * (4 if residual else 3) + 2 * n * elt


def rms_norm_rows(device: str, dtype: str = "bfloat16", hidden: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
                  tokens: Sequence[int] = (4096, 16384), residual: bool = False, compile: bool = True,
                  repeats: int = 5, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Forward, backward alone and forward+backward of the Triton RMSNorm vs eager and compiled references."""
    from kernels.rms_norm import rms_norm, rms_norm_ref

    dt = getattr(torch, dtype)
    eps = 1e-6
    impls = {"triton": rms_norm, "eager": rms_norm_ref}
    if compile:
        impls["compile"] = torch.compile(rms_norm_ref)
    rows = []
    for n in hidden:
        for m in tokens:
            x = torch.randn(m, n, device=device, dtype=dt, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dt, requires_grad=True)
            r = torch.randn(m, n, device=device, dtype=dt, requires_grad=True) if residual else None
            dy = torch.randn(m, n, device=device, dtype=dt)
            inputs = [x, w] + ([r] if r is not None else [])
            for name, f in impls.items():
                def fwd(f=f, x=x, w=w, r=r) -> object:
                    with torch.no_grad():
                        return f(x, w, eps, r)

                # autograd.grad, not .backward(): no .grad accumulation kernels in the timing
                def fwd_bwd(f=f, x=x, w=w, r=r, inputs=inputs, dy=dy) -> None:
                    out = f(x, w, eps, r)
                    torch.autograd.grad(out[0] if r is not None else out, inputs, dy)

                graph = f(x, w, eps, r)
                graph = graph[0] if r is not None else graph

                def bwd(graph=graph, inputs=inputs, dy=dy) -> None:  # the backward alone, on a recorded graph
                    torch.autograd.grad(graph, inputs, dy, retain_graph=True)

                for mode, fn in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
                    ms, p20, p80 = time_op(fn, device, repeats)
                    nbytes = rms_norm_traffic(m, n, dt.itemsize, residual, mode != "fwd")
                    if mode == "bwd":  # its own traffic only: the forward's reads and writes are not in it
                        nbytes -= rms_norm_traffic(m, n, dt.itemsize, residual, False)
                    row = dict(op="rms_norm", impl=name, mode=mode, tokens=m, hidden=n, dtype=dtype,
                               residual=residual, ms=ms, ms_p20=p20, ms_p80=p80, **_gbps(nbytes, ms, p20, p80))
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_rows(device: str, dtype: str = "bfloat16", tokens: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
              heads: int = 32, kv_heads: int = 8, head_dim: int = 128, compile: bool = True, repeats: int = 5,
              on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Forward, backward alone and forward+backward of the Triton RoPE (q and k in one launch, Llama 3.1
    frequencies) vs eager and compiled references. GB/s counts q and k read plus written per pass."""
    from kernels.rope import rope, rope_ref

    from ..modeling.rope import llama3_rope

    dt = getattr(torch, dtype)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    inv_freq = llama3_rope(head_dim, 500000.0, scaling, 131072)[0].to(device)
    impls = {"triton": rope, "torch_eager": rope_ref}
    if compile:
        impls["torch_compile"] = torch.compile(rope_ref, dynamic=False)
    rows = []
    for n in tokens:
        q = torch.randn(1, n, heads, head_dim, device=device, dtype=dt)
        k = torch.randn(1, n, kv_heads, head_dim, device=device, dtype=dt)
        pos = torch.arange(n, device=device)[None]
        io_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write of q and k, one pass
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        for name, fn in impls.items():
            for mode, call, passes in _rope_calls(fn, q, k, pos, inv_freq, gq, gk):
                ms, p20, p80 = time_op(call, device, repeats)
                row = dict(op="rope", impl=name, mode=mode, tokens=n, ms=ms, ms_p20=p20, ms_p80=p80,
                           **_gbps(passes * io_bytes, ms, p20, p80))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _rope_calls(fn, q, k, pos, inv_freq, gq, gk):
    """(mode, callable, passes over q and k) for the forward, backward and forward+backward of ``fn``."""
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()

    def forward():
        return fn(q, k, pos, inv_freq)

    def forward_backward():
        out = fn(qg, kg, pos, inv_freq)
        torch.autograd.backward(out, (gq, gk))
        qg.grad = kg.grad = None

    graph = fn(qg, kg, pos, inv_freq)

    def backward():  # the backward pass alone, on a recorded graph
        torch.autograd.grad(graph, (qg, kg), (gq, gk), retain_graph=True)

    return ("forward", forward, 1), ("backward", backward, 1), ("forward_backward", forward_backward, 2)
