"""The issue's performance targets, evaluated from a record (never asserted in tests: they are facts
about one machine on one day, recorded beside the numbers they come from).

Each result carries the [min, max] of the per-repeat ratios behind it where the rows have them, and
``within_noise``: the limit lies inside that range, so the verdict is the median's and a rerun may flip it.
A ratio measured once has no range to tell it from noise: it gets no verdict (``ok`` None) and ``no_verdict``
says why, rather than a met/MISSED that the next run may flip.
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]
FLOAT_DTYPES = ("float32", "bfloat16")
MIN_REPEATS = 2  # the fewest repeats whose ratios have a spread


def _rows(model: dict[str, Any], bench: str, **match: Any) -> list[Row]:
    return [r for r in model.get(bench, []) if all(r.get(k) == v for k, v in match.items())]


def _check(name: str, value: float | None, limit: float, higher_is_better: bool, unit: str = "",
           spread: list[float] | None = None, repeats: int | None = None) -> dict[str, Any]:
    """One target's result. ``repeats``: how many times the ratio was measured (None: unknown, as in rows
    written before it was recorded); fewer than two leave a ratio without a verdict."""
    ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
    out = {"target": name, "value": value, "limit": limit, "unit": unit, "ok": ok}
    if unit == "x":  # a ratio: say how noisy it is (None: the rows did not record it)
        out["spread"] = spread
        out["within_noise"] = None if not spread else spread[0] <= limit <= spread[1]
        if value is not None and repeats is not None and repeats < MIN_REPEATS:
            out.update(ok=None, within_noise=None,
                       no_verdict=f"{repeats} repeat, no spread to tell it from noise (needs {MIN_REPEATS}+)")
    return out


def _best(rows: list[Row], key: str) -> Row | None:
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def _worst(rows: list[Row], key: str) -> Row | None:
    rows = [r for r in rows if r.get(key) is not None]
    return min(rows, key=lambda r: r[key]) if rows else None


def evaluate(model: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    """Targets that apply to this model on this kind of device (CPU: fp32 synthetic-100m, and every fp32/bf16
    model where llama.cpp was measured; GPU: bf16 8B)."""
    s = model["settings"]
    repeats = s.get("repeats")
    out = []
    cpp = any(r["impl"] == "llama_cpp" for r in model.get("decode", []) + model.get("prefill", []))
    synthetic = device_type == "cpu" and s.get("preset") == "synthetic-100m" and s["dtype"] == "float32"
    if synthetic or (device_type == "cpu" and cpp and s["dtype"] in FLOAT_DTYPES):
        for mode in dict.fromkeys(r["mode"] for r in _rows(model, "prefill", impl="llama_core")):
            if mode.startswith("int8"):
                continue  # a speed target of the full-precision model (int8 is compared with llama.cpp's Q8_0)
            worst = _worst(_rows(model, "prefill", impl="llama_core", mode=mode), "vs_transformers")
            out.append(_check(f"prefill speed vs transformers, llama_core {mode}, {s['dtype']} (worst prompt "
                              "length; >= 1.0 means time <= 1.0x)", worst and worst["vs_transformers"], 1.0, True,
                              "x", worst and worst.get("vs_transformers_spread"), repeats))
    if synthetic:
        for r in _rows(model, "decode", impl="llama_core", batch=1):
            if not r["mode"].startswith("int8"):
                out.append(_check(f"decode tok/s vs transformers generate, batch 1, llama_core {r['mode']}",
                                  r["vs_transformers"], 1.5, True, "x", r.get("vs_transformers_spread"), repeats))
        load = _rows(model, "load", impl="llama_core")
        if load and load[0].get("rss_ratio_vs_transformers") is not None:
            out.append(_check("load peak RSS (added by the load) vs transformers",
                              load[0]["rss_ratio_vs_transformers"], 1.0, False, "x",
                              load[0].get("rss_ratio_vs_transformers_spread"), load[0].get("repeats")))
    if device_type == "cpu" and cpp and s["dtype"] in FLOAT_DTYPES:
        ours = _rows(model, "decode", impl="llama_core", batch=1)
        best = _best([r for r in ours if not r["mode"].startswith("int8")], "vs_llama_cpp")
        out.append(_check(f"decode tok/s vs llama.cpp, batch 1, {s['dtype']}, best llama_core candidate"
                          + (f" ({best['mode']})" if best else ""), best and best["vs_llama_cpp"], 1.0, True, "x",
                          best and best.get("vs_llama_cpp_spread"), repeats))
        best = _best([r for r in ours if r["mode"].startswith("int8")], "vs_llama_cpp")
        if best is not None:
            out.append(_check(f"decode tok/s of int8-weight-only vs llama.cpp Q8_0, batch 1, {s['dtype']} "
                              f"activations ({best['mode']})", best["vs_llama_cpp"], 0.8, True, "x",
                              best.get("vs_llama_cpp_spread"), repeats))
    if device_type == "cuda" and s.get("preset") == "llama3-8b" and s["dtype"] == "bfloat16":
        for r in _rows(model, "decode", impl="llama_core", mode="compiled", batch=1):
            out.append(_check("decode, static cache + compile, batch 1", r["tok_s"], 150.0, True, "tok/s"))
        for r in _rows(model, "decode", impl="llama_core", mode="eager", batch=1):
            out.append(_check("eager decode vs transformers eager, batch 1", r["vs_transformers"], 1.0, True, "x",
                              r.get("vs_transformers_spread"), repeats))
        for r in _rows(model, "prefill", impl="llama_core", tokens=2048):
            out.append(_check(f"prefill 2048 tokens, {r['mode']}", r["tflops"], 450.0, True, "TFLOP/s"))
    return out
