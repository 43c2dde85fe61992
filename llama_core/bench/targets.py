"""The issue's performance targets, evaluated from a record (never asserted in tests: they are facts
about one machine on one day, recorded beside the numbers they come from)."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def _rows(model: dict[str, Any], bench: str, **match: Any) -> list[Row]:
    return [r for r in model.get(bench, []) if all(r.get(k) == v for k, v in match.items())]


def _check(name: str, value: float | None, limit: float, higher_is_better: bool, unit: str = "") -> dict[str, Any]:
    ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
    return {"target": name, "value": value, "limit": limit, "unit": unit, "ok": ok}


def evaluate(model: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    """Targets that apply to this model on this kind of device (CPU: fp32 synthetic-100m; GPU: bf16 8B)."""
    s = model["settings"]
    out = []
    if device_type == "cpu" and s["preset"] == "synthetic-100m" and s["dtype"] == "float32":
        for mode in dict.fromkeys(r["mode"] for r in _rows(model, "prefill", impl="llama_core")):
            prefill = _rows(model, "prefill", impl="llama_core", mode=mode)
            worst = min((r["vs_transformers"] for r in prefill if r.get("vs_transformers")), default=None)
            out.append(_check(f"prefill speed vs transformers, llama_core {mode} (worst prompt length; "
                              ">= 1.0 means time <= 1.0x)", worst, 1.0, True, "x"))
        for r in _rows(model, "decode", impl="llama_core", batch=1):
            out.append(_check(f"decode tok/s vs transformers generate, batch 1, llama_core {r['mode']}",
                              r["vs_transformers"], 1.5, True, "x"))
        load = _rows(model, "load", impl="llama_core")
        if load and load[0].get("rss_ratio_vs_transformers") is not None:
            out.append(_check("load peak RSS (added by the load) vs transformers",
                              load[0]["rss_ratio_vs_transformers"], 1.0, False, "x"))
    if device_type == "cuda" and s["preset"] == "llama3-8b" and s["dtype"] == "bfloat16":
        for r in _rows(model, "decode", impl="llama_core", mode="compiled", batch=1):
            out.append(_check("decode, static cache + compile, batch 1", r["tok_s"], 150.0, True, "tok/s"))
        for r in _rows(model, "decode", impl="llama_core", mode="eager", batch=1):
            out.append(_check("eager decode vs transformers eager, batch 1", r["vs_transformers"], 1.0, True, "x"))
        for r in _rows(model, "prefill", impl="llama_core", tokens=2048):
            out.append(_check(f"prefill 2048 tokens, {r['mode']}", r["tflops"], 450.0, True, "TFLOP/s"))
    return out
