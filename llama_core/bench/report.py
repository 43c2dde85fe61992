"""Records (JSON under benchmarks/results/), the stdout table and README-ready markdown, all rendered
from the record alone so that committed results can be re-rendered later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .environment import slug

Record = dict[str, Any]


def record_path(record: Record, directory: Path) -> Path:
    presets = "+".join(m["settings"]["preset"] for m in record["models"]) or "kernels"
    quick = "-quick" if record["settings"].get("quick") else ""
    return directory / f"bench-{presets}-{slug(record['environment']['device'])}{quick}.json"


def write_record(record: Record, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = record_path(record, directory)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # never a half-written record
    return path


def load_record(path: str | Path) -> Record:
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or "environment" not in record or "models" not in record:
        raise ValueError(f"{path} is not a llama-core bench record (no 'environment' / 'models')")
    return record


# ------------------------------------------------------------------------------------------ formatting
def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _name(r: dict[str, Any]) -> str:
    return f"{r['impl']} {r['mode']}"


def hardware(record: Record) -> str:
    e = record["environment"]
    where = f"{e['device']}" + (f" ({e['cpu_count']} cores, {e['torch_threads']} threads)"
                                if e["device_type"] == "cpu" else "")
    return (f"{where}; torch {e['torch']}, transformers {e['transformers'] or '-'}, triton {e['triton'] or '-'}; "
            f"llama-core {e['git_sha']}, {e['date'][:10]}")


def model_title(m: dict[str, Any]) -> str:
    s, check = m["settings"], m["sanity"]
    same = (f"same weights as transformers: max |logit diff| {check['max_abs_logit_diff']:.2g}, "
            f"argmax agreement {check['argmax_agreement']:.0%}" if check.get("compared") else "no transformers")
    return f"{s['preset']}: {m['params'] / 1e6:,.1f}M parameters, {s['dtype']}; {same}"


def prefill_rows(m: dict[str, Any]) -> list[list[str]]:
    return [[f"{r['tokens']}", _name(r), _ms(r["median_s"]), f"{r['tok_s']:,.0f}", f"{r['tflops']:.3g}",
             _mb(r["added_mem_bytes"]), _x(r["vs_transformers"])] for r in m.get("prefill", [])]


def decode_rows(m: dict[str, Any]) -> list[list[str]]:
    return [[f"{r['batch']}", _name(r), f"{r['ms_per_step']:,.1f} ms",
             "-" if r["tok_s"] is None else f"{r['tok_s']:,.1f}",
             "-" if r["gb_s"] is None else f"{r['gb_s']:,.1f} ({r['frac_copy_bw']:.0%})",
             _mb(r["added_mem_bytes"]), _x(r["vs_transformers"]),
             {True: "yes", False: "no", None: "-"}[r.get("same_tokens_as_transformers")]] for r in m.get("decode", [])]


def load_rows(m: dict[str, Any]) -> list[list[str]]:
    return [[r["impl"], _ms(r["median_s"]), _mb(r["peak_rss_bytes"]), _mb(r["added_rss_bytes"]),
             _mb(r["peak_rss_after_forward_bytes"]), _x(r.get("vs_transformers"))] for r in m.get("load", [])]


PREFILL_HEAD = ["prompt", "implementation", "time", "tok/s", "TFLOP/s", "added memory", "speed vs transformers"]
DECODE_HEAD = ["batch", "implementation", "per step", "tok/s", "GB/s (of copy bw)", "added memory",
               "speed vs transformers", "same tokens"]
LOAD_HEAD = ["loader", "time", "peak RSS", "added by load", "peak after 1st forward", "speed vs transformers"]


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  " + "  ".join(c.rjust(w) if i != 1 else c.ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(head), *(line(r) for r in rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _sections(record: Record, table) -> list[tuple[str, str]]:
    out = []
    for m in record["models"]:
        s = m["settings"]
        parts = []
        if m.get("prefill"):
            parts.append(("prefill (last-position logits)", table(PREFILL_HEAD, prefill_rows(m))))
        if m.get("decode"):
            parts.append((f"decode via generate (greedy, prompt {s['decode_prompt_len']}, "
                          f"{s['decode_tokens']} new tokens)", table(DECODE_HEAD, decode_rows(m))))
        if m.get("load"):
            parts.append(("checkpoint load (fresh process each)", table(LOAD_HEAD, load_rows(m))))
        out.append((model_title(m), parts))
    return out


def format_table(record: Record) -> str:
    """The human-readable summary printed by ``llama-core bench``."""
    lines = [f"llama-core bench on {hardware(record)}",
             f"device copy bandwidth: {record['copy_bandwidth_gb_s']:,.1f} GB/s"]
    for title, parts in _sections(record, _text_table):
        lines += ["", f"== {title}"]
        for name, body in parts:
            lines += [f"{name}:", body]
    for name, rows in record.get("kernels", {}).items():
        lines += ["", f"== kernel {name}"]
        lines += [f"  {r['impl']:14s} {r['mode']:16s} " + " ".join(f"{k}={r[k]}" for k in ("tokens", "hidden") if k in r)
                  + f"  {r['ms']:.4f} ms  {r['gbps']:,.0f} GB/s" for r in rows]
    targets = [t for m in record["models"] for t in m.get("targets", [])]
    if targets:
        lines += ["", "targets:"]
        for t in targets:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["ok"]]
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"  [{verdict}] {t['target']}: {value} {t['unit']} (target {t['limit']:g} {t['unit']})")
    return "\n".join(lines)


def render_markdown(record: Record) -> str:
    """README-ready tables naming the hardware and software the numbers were measured on."""
    lines = [f"Measured by `llama-core bench{' --quick' if record['settings'].get('quick') else ''}` on "
             f"{hardware(record)} (copy bandwidth {record['copy_bandwidth_gb_s']:,.1f} GB/s; median of "
             f"{record['models'][0]['settings']['repeats'] if record['models'] else '-'} interleaved repeats):"]
    for title, parts in _sections(record, _md_table):
        lines += ["", f"**{title}**"]
        for name, body in parts:
            lines += ["", f"{name[0].upper()}{name[1:]}:", "", body]
    for name, rows in record.get("kernels", {}).items():
        if rows:
            head = ["impl", "mode", "tokens", "ms", "GB/s"]
            lines += ["", f"Kernel `{name}`:", "",
                      _md_table(head, [[r["impl"], r["mode"], str(r.get("tokens", "")), f"{r['ms']:.4f}",
                                        f"{r['gbps']:,.0f}"] for r in rows])]
    return "\n".join(lines) + "\n"
