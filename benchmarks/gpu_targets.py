"""The targets of issues 18 (kernels) and 19 (end to end), judged from the rows of a GPU check.

Each target gives PASS, MISS or NOT RUN (its rows are missing: the stage was skipped, stopped by the budget or
failed) with the number behind it. A verdict is about one machine on one day: recorded, never asserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

Row = dict[str, Any]


@dataclass
class Target:
    issue: int
    name: str
    limit: float
    unit: str  # "x" (a ratio), "frac" (of the copy bandwidth), "TFLOP/s", "count"
    value: float | None = None  # None: NOT RUN
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "NOT RUN"
        return "PASS" if self.value >= self.limit else "MISS"

    def line(self) -> str:
        if self.value is None:
            number = "-"
        elif self.unit == "frac":
            number = f"{self.value:.0%} (>= {self.limit:.0%})"
        elif self.unit == "x":
            number = f"{self.value:.2f}x (>= {self.limit:g}x)"
        else:
            number = f"{self.value:.4g} {self.unit} (>= {self.limit:g})"
        tail = f"  [{self.detail}]" if self.detail else ""
        return f"{self.status:8s} #{self.issue} {self.name}: {number}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def _select(rows: list[Row], kind: str, **match: Any) -> list[Row]:
    return [r for r in rows if r.get("kind") == kind and all(r.get(k) == v for k, v in match.items())]


def _copy_gb_s(rows: list[Row]) -> float | None:
    values = [r["gb_s"] for r in _select(rows, "copy_bandwidth")]
    return max(values) if values else None  # the best copy seen: the strictest ceiling


def _worst(values: list[tuple[float, str]]) -> tuple[float | None, str]:
    return min(values) if values else (None, "")


def _bandwidth_target(rows: list[Row], op: str, mode: str, limit: float, name: str) -> Target:
    t = Target(18, name, limit, "frac")
    bw = _copy_gb_s(rows)
    got = [(r["gbps"] / bw, f"{r['gbps']:.0f} GB/s of copy {bw:.0f}") for r in _select(rows, op, impl="triton",
                                                                                       mode=mode)] if bw else []
    t.value, t.detail = _worst(got)
    return t


def _vs_compile_target(rows: list[Row], op: str, compiled: str) -> Target:
    """The Triton kernel's worst speed ratio over torch.compile of the reference, over every mode and shape."""
    t = Target(18, f"{op}: Triton faster than torch.compile of the reference (worst mode)", 1.0, "x")
    got = []
    for r in _select(rows, op, impl="triton"):
        ref = [c for c in _select(rows, op, impl=compiled, mode=r["mode"]) if c.get("tokens") == r.get("tokens")]
        if ref:
            got.append((ref[0]["ms"] / r["ms"], f"{r['mode']} {r['ms']:.3f} vs {ref[0]['ms']:.3f} ms"))
    t.value, t.detail = _worst(got)
    return t


def _gemm_target(rows: list[Row], impl: str, limit: float, m_ok: Callable[[int], bool], name: str) -> Target:
    t = Target(18, name, limit, "x")
    got = [(r["speedup_vs_dense"], f"worst M={r['m']} K={r['k']} N={r['n']}")
           for r in _select(rows, "int8_matmul", impl=impl) if m_ok(r["m"]) and r.get("speedup_vs_dense")]
    t.value, t.detail = _worst(got)
    return t


def kernel_targets(rows: list[Row]) -> list[Target]:
    tests = _select(rows, "pytest")
    pytest_t = Target(18, "gpu-marked tests (real shapes, exactness) pass", 1.0, "frac")
    if tests and tests[0]["tests"]:
        r = tests[0]
        ran = r["passed"] + r["failed"] + r["errors"]
        pytest_t.value = r["passed"] / ran if ran else None
        pytest_t.detail = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    exact = _select(rows, "int8_exact")
    exact_t = Target(18, "int8 W8A8 kernel == reference at every benchmarked shape", 1.0, "frac",
                     sum(r["exact"] for r in exact) / len(exact) if exact else None,
                     f"{sum(r['exact'] for r in exact)}/{len(exact)} shapes" if exact else "")
    return [
        pytest_t, exact_t,
        _bandwidth_target(rows, "rms_norm", "fwd", 0.85, "RMSNorm fwd >= 85% of copy bandwidth"),
        _bandwidth_target(rows, "rms_norm", "bwd", 0.70, "RMSNorm bwd >= 70% of copy bandwidth"),
        _vs_compile_target(rows, "rms_norm", "compile"),
        _bandwidth_target(rows, "rope", "forward", 0.80, "RoPE fwd >= 80% of copy bandwidth"),
        _bandwidth_target(rows, "rope", "backward", 0.80, "RoPE bwd >= 80% of copy bandwidth"),
        _vs_compile_target(rows, "rope", "torch_compile"),
        _gemm_target(rows, "w8a8_linear", 1.5, lambda m: m >= 512, "W8A8 linear >= 1.5x cuBLAS bf16 at M >= 512"),
        _gemm_target(rows, "weight_only", 1.6, lambda m: m <= 16, "int8 weight-only >= 1.6x cuBLAS bf16 at M <= 16"),
    ]


def e2e_targets(rows: list[Row]) -> list[Target]:
    out = []
    models = {r["preset"]: r.get("layers") for r in _select(rows, "e2e_model")}
    for preset in models or ("llama3-8b", "llama3.2-1b"):
        label = f"{preset} ({models[preset]} layers)" if models.get(preset) else preset
        decode = _select(rows, "e2e_decode", preset=preset, batch=1)
        comp = [r for r in decode if r["impl"] == "llama_core" and r["mode"] == "compiled" and r.get("frac_copy_bw")]
        out.append(Target(19, f"{label}: compiled decode >= 75% of the bandwidth floor, batch 1", 0.75, "frac",
                          comp[0]["frac_copy_bw"] if comp else None,
                          f"{comp[0]['tok_s']:.0f} tok/s, {comp[0]['gb_s']:.0f} GB/s" if comp else ""))
        wo = [r for r in decode if r["mode"] == "int8-weight-only-compiled" and r.get("tok_s")]
        ratio = wo[0]["tok_s"] / comp[0]["tok_s"] if wo and comp else None
        out.append(Target(19, f"{label}: int8 weight-only compiled decode >= 1.5x bf16 compiled, batch 1", 1.5, "x",
                          ratio, f"{wo[0]['tok_s']:.0f} tok/s" if wo else ""))
        eager = [r for r in decode if r["impl"] == "llama_core" and r["mode"] == "eager"]
        out.append(Target(19, f"{label}: eager decode >= transformers eager, batch 1", 1.0, "x",
                          eager[0].get("vs_transformers") if eager else None))
        pre = [r for r in _select(rows, "e2e_prefill", preset=preset, tokens=2048, impl="llama_core")]
        best = max(pre, key=lambda r: r["tflops"]) if pre else None
        out.append(Target(19, f"{label}: prefill 2048 tokens >= 450 TFLOP/s", 450.0, "TFLOP/s",
                          best["tflops"] if best else None, best["mode"] if best else ""))
        out.append(Target(19, f"{label}: prefill 2048 tokens >= transformers eager", 1.0, "x",
                          best.get("vs_transformers") if best else None, best["mode"] if best else ""))
    steps = _select(rows, "train_step")
    # the first steps hold the compilation: judge the best of the later ones
    later = [r for r in steps[2:] if r.get("mfu") is not None]
    best = max(later, key=lambda r: r["mfu"]) if later else None
    out.append(Target(19, "training MFU >= 40% (1B shape, bf16, compile, kernels, fused loss)", 0.40, "frac",
                      best["mfu"] if best else None, f"{best['tokens_per_s']:,.0f} tok/s" if best else ""))
    return out


def _paired(rows: list[Row], impl: str, other: str, m_ok: Callable[[int], bool]) -> list[tuple[float, Row]]:
    """``time(other) / time(impl)`` (> 1: ``impl`` is faster) at each (M, K, N) where both were measured."""
    gemm = _select(rows, "int8_matmul")
    out = []
    for r in gemm:
        if r["impl"] == impl and m_ok(r["m"]):
            o = [x for x in gemm if x["impl"] == other and (x["m"], x["k"], x["n"]) == (r["m"], r["k"], r["n"])]
            if o:
                out.append((o[0]["ms"] / r["ms"], r))
    return out


def decisions(rows: list[Row]) -> list[str]:
    """Choices between kernel variants, made from this run's measurements (one line each, for the summary)."""
    out = []
    for impl in ("weight_only", "w8a8_gemm"):
        split = _paired(rows, impl, f"{impl}_plain", lambda m: m <= 16)
        if not split:
            continue
        wins = sum(x > 1.0 for x, _ in split)
        worst = min(split, key=lambda p: p[0])
        verdict = ("keep split-K (kernels/int8_split_k.py SPLIT_K_MAX_M = 16)" if wins * 2 > len(split)
                   else "split-K loses: set SPLIT_K_MAX_M = 0 (or tune split_k_for)")
        out.append(f"DECIDE   {impl} split-K at M <= 16: faster at {wins}/{len(split)} points, worst "
                   f"{worst[0]:.2f}x at M={worst[1]['m']} K={worst[1]['k']} N={worst[1]['n']} -> {verdict}")
    branch = _paired(rows, "w8a8_linear_t0", "w8a8_linear", lambda m: True)
    if branch:
        ratios = sorted(x for x, _ in branch)
        median = ratios[len(ratios) // 2]
        verdict = ("the outlier branch costs < 5%: keep threshold 6 as the default" if median < 1.05
                   else "the outlier branch costs >= 5%: consider threshold 0 (pure W8A8) where accuracy allows")
        out.append(f"DECIDE   W8A8 outlier branch: threshold 0 is {median:.2f}x the speed of threshold 6 (median of "
                   f"{len(ratios)} points) -> {verdict}")
    return out


def evaluate(rows: list[Row], parts: list[str]) -> list[Target]:
    return (kernel_targets(rows) if "kernels" in parts else []) + (e2e_targets(rows) if "e2e" in parts else [])
