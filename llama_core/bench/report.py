"""Records (JSON, in bench-results/ or --output; the committed ones in benchmarks/results/), the stdout table
and README-ready markdown, all rendered from the record alone so that committed results can be re-rendered
later (records written before llama.cpp, --model and the ratio spreads existed render as they did: a column
appears only when a row has its field)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .environment import slug

Record = dict[str, Any]


DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


def model_name(m: dict[str, Any]) -> str:
    """The preset, or the --model checkpoint's name (records before --model only have the preset)."""
    return m["settings"].get("name") or m["settings"]["preset"]


def record_path(record: Record, directory: Path) -> Path:
    """``bench-<models>[-<dtype>]-<device>[-quick].json``; the dtype only where it is not the device's default,
    so an fp32 and a bf16 run of one model keep separate records."""
    names = "+".join(slug(model_name(m).removesuffix(".gguf")) for m in record["models"]) or "kernels"
    default = DEFAULT_DTYPES.get(record["environment"]["device_type"])
    dtypes = sorted({m["settings"]["dtype"] for m in record["models"]} - {default})
    dtype = "".join(f"-{d}" for d in dtypes)
    quick = "-quick" if record["settings"].get("quick") else ""
    return directory / f"bench-{names}{dtype}-{slug(record['environment']['device'])}{quick}.json"


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


def _ratio(r: dict[str, Any], key: str) -> str:
    """A speed ratio with the [min, max] of its per-repeat ratios, where the record has them."""
    value, spread = r.get(key), r.get(f"{key}_spread")
    if value is None or not spread:
        return _x(value)
    return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def _yes(v: bool | None) -> str:
    return {True: "yes", False: "no", None: "-"}[v]


def _same(r: dict[str, Any], other: str) -> str:
    """Whether greedy tokens equal the other library's; where not, how many new tokens agree first."""
    same = r.get(f"same_tokens_as_{other}")
    prefix = r.get(f"common_prefix_with_{other}")
    if same is False and prefix is not None:
        return f"no (first {prefix} of {r['new_tokens']})"
    return _yes(same)


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def _name(r: dict[str, Any]) -> str:
    return f"{r['impl']} {r['mode']}"


def hardware(record: Record) -> str:
    e = record["environment"]
    where = f"{e['device']}" + (f" ({e['cpu_count']} cores, {e['torch_threads']} threads)"
                                if e["device_type"] == "cpu" else "")
    cpp = next((m["llama_cpp"]["version"] for m in record["models"] if m.get("llama_cpp", {}).get("version")), None)
    return (f"{where}; torch {e['torch']}, transformers {e['transformers'] or '-'}, triton {e['triton'] or '-'}"
            + (f", llama-cpp-python {cpp}" if cpp else "") + f"; llama-core {e['git_sha']}, {e['date'][:10]}"
            + (f"; load average {e['load_average'][0]:.2f} at start" if e.get("load_average") else "")
            + (f", {record['load_average_end'][0]:.2f} at the end" if record.get("load_average_end") else ""))


def model_title(m: dict[str, Any]) -> str:
    s, check = m["settings"], m["sanity"]
    same = (f"same weights as transformers: max |logit diff| {check['max_abs_logit_diff']:.2g}, "
            f"argmax agreement {check['argmax_agreement']:.0%}" if check.get("compared") else "no transformers")
    weights = m.get("weights", {})
    kind = (f" ({weights['format'].upper()}" + (f" {weights['gguf_file_type']}" if weights.get("gguf_file_type")
                                                else "") + ")" if weights.get("kind") == "checkpoint" else "")
    return f"{model_name(m)}{kind}: {m['params'] / 1e6:,.1f}M parameters, {s['dtype']}; {same}"


def model_notes(m: dict[str, Any]) -> list[str]:
    """How the prompts were made and how llama.cpp ran (or why it did not), for records that say."""
    notes = []
    if m["sanity"].get("prompts"):
        notes.append(f"prompts: {m['sanity']['prompts']}")
    cpp = m.get("llama_cpp")
    if cpp and cpp.get("skipped"):
        notes.append(f"llama.cpp: not measured ({cpp['skipped']})")
    for f in (cpp or {}).get("files", []):
        check = m["sanity"].get("llama_cpp", {}).get(f["mode"], {})
        logits = (f"; last-position logits vs llama_core: max |diff| {check['max_abs_logit_diff']:.2g} "
                  f"(logits up to {check['max_abs_logit']:.3g}), same argmax: {_yes(check.get('same_argmax'))}"
                  if check else "")
        origin = "written for the run" if f["written_for_run"] else "the --model file as is"
        notes.append(f"llama.cpp {f['mode']}: {f['file']} ({origin}), {f['threads']} threads, KV cache {f['kv_cache']}, "
                     f"n_batch {f['n_batch']}, n_ubatch {f['n_ubatch']}{logits}")
    return notes


def prefill_rows(m: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = m.get("prefill", [])
    cpp, first = _has(rows, "vs_llama_cpp"), _has(rows, "first_call_s")
    head = PREFILL_HEAD + ["speed vs llama.cpp"] * cpp + ["1st call"] * first
    return head, [[f"{r['tokens']}", _name(r), _ms(r["median_s"]), f"{r['tok_s']:,.0f}", f"{r['tflops']:.3g}",
                   _mb(r["added_mem_bytes"]), _ratio(r, "vs_transformers")]
                  + [_ratio(r, "vs_llama_cpp")] * cpp + ([_ms(r["first_call_s"])] if first else []) for r in rows]


def decode_rows(m: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = m.get("decode", [])
    # Token agreement is known even where the speed ratio is not (a decode time drowned in noise on a busy box).
    cpp = _has(rows, "vs_llama_cpp") or _has(rows, "same_tokens_as_llama_cpp")
    compiled = any("compiled" in r["mode"] and r.get("compile_s") is not None for r in rows)
    weights = _has(rows, "weight_bytes")
    head = (DECODE_HEAD[:5] + ["weights read per step"] * weights + DECODE_HEAD[5:]
            + ["speed vs llama.cpp", "same tokens as llama.cpp"] * cpp + ["compile time"] * compiled)
    return head, [[f"{r['batch']}", _name(r), f"{r['ms_per_step']:,.1f} ms",
                   "-" if r["tok_s"] is None else f"{r['tok_s']:,.1f}",
                   "-" if r["gb_s"] is None else f"{r['gb_s']:,.1f} ({r['frac_copy_bw']:.0%})"]
                  + ([_mb(r["weight_bytes"])] if weights else [])
                  + [_mb(r["added_mem_bytes"]), _ratio(r, "vs_transformers"), _same(r, "transformers")]
                  + [_ratio(r, "vs_llama_cpp"), _same(r, "llama_cpp")] * cpp
                  + ([_ms(r["compile_s"]) if "compiled" in r["mode"] else "-"] if compiled else []) for r in rows]


def load_rows(m: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = m.get("load", [])
    files = _has(rows, "file")
    head = LOAD_HEAD[:1] + ["file"] * files + LOAD_HEAD[1:]
    return head, [[r["impl"]] + [r.get("file") or "-"] * files
                  + [_ms(r["median_s"]), _mb(r["peak_rss_bytes"]), _mb(r["added_rss_bytes"]),
                     _mb(r["peak_rss_after_forward_bytes"]), _x(r.get("vs_transformers"))] for r in rows]


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
            parts.append(("prefill (last-position logits)", table(*prefill_rows(m))))
        if m.get("decode"):
            parts.append((f"decode via generate (greedy, prompt {s['decode_prompt_len']}, "
                          f"{s['decode_tokens']} new tokens)", table(*decode_rows(m))))
        if m.get("load"):
            parts.append(("checkpoint load (fresh process each)", table(*load_rows(m))))
        out.append((model_title(m), model_notes(m), parts))
    return out


def _spread_note(record: Record) -> list[str]:
    rows = [r for m in record["models"] for b in ("prefill", "decode") for r in m.get(b, [])]
    if not _has(rows, "vs_transformers_spread"):
        return []
    return ["", "Speed ratios: > 1 means the row is faster than the library the column names; in brackets the "
            "lowest and highest ratio of the single interleaved repeats, the noise each ratio carries."]


def target_lines(record: Record) -> list[str]:
    lines = []
    for t in (t for m in record["models"] for t in m.get("targets", [])):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["ok"]]
        if t.get("no_verdict"):  # measured, but too few repeats to judge (see targets._check)
            verdict = f"no verdict: {t['no_verdict']}"
        if t.get("within_noise"):
            verdict += ", within noise"
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        spread = (f" (repeats {t['spread'][0]:.3g}-{t['spread'][1]:.3g})" if t.get("spread") and not t.get("no_verdict")
                  else "")  # one repeat's "range" is a single value, not a spread
        where = f"{t['model']}: " if t.get("model") else ""
        lines.append(f"[{verdict}] {where}{t['target']}: {value} {t['unit']}{spread} (target {t['limit']:g} {t['unit']})")
    return lines


def format_table(record: Record) -> str:
    """The human-readable summary printed by ``llama-core bench``."""
    lines = [f"llama-core bench on {hardware(record)}",
             f"device copy bandwidth: {record['copy_bandwidth_gb_s']:,.1f} GB/s"]
    for title, notes, parts in _sections(record, _text_table):
        lines += ["", f"== {title}", *notes]
        for name, body in parts:
            lines += [f"{name}:", body]
    for name, rows in record.get("kernels", {}).items():
        lines += ["", f"== kernel {name}"]
        lines += [f"  {r['impl']:14s} {r['mode']:16s} " + " ".join(f"{k}={r[k]}" for k in ("tokens", "hidden") if k in r)
                  + f"  {r['ms']:.4f} ms  {r['gbps']:,.0f} GB/s" for r in rows]
    targets = target_lines(record)
    if targets:
        lines += ["", "targets:", *(f"  {t}" for t in targets)]
    return "\n".join(lines)


def render_markdown(record: Record) -> str:
    """README-ready tables naming the hardware and software the numbers were measured on."""
    lines = [f"Measured by `llama-core bench{' --quick' if record['settings'].get('quick') else ''}` on "
             f"{hardware(record)} (copy bandwidth {record['copy_bandwidth_gb_s']:,.1f} GB/s; median of "
             f"{record['models'][0]['settings']['repeats'] if record['models'] else '-'} interleaved repeats):"]
    lines += _spread_note(record)
    for title, notes, parts in _sections(record, _md_table):
        lines += ["", f"**{title}**"]
        if notes:
            lines += ["", *(f"- {n}" for n in notes)]
        for name, body in parts:
            lines += ["", f"{name[0].upper()}{name[1:]}:", "", body]
    for name, rows in record.get("kernels", {}).items():
        if rows:
            head = ["impl", "mode", "tokens", "ms", "GB/s"]
            lines += ["", f"Kernel `{name}`:", "",
                      _md_table(head, [[r["impl"], r["mode"], str(r.get("tokens", "")), f"{r['ms']:.4f}",
                                        f"{r['gbps']:,.0f}"] for r in rows])]
    # Records from before the noise verdicts rendered without targets; they still do.
    if any("within_noise" in t for m in record["models"] for t in m.get("targets", [])):
        lines += ["", "Targets:", "", *(f"- {t}" for t in target_lines(record))]
    return "\n".join(lines) + "\n"
