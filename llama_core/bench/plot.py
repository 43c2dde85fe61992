"""One PNG per benchmark (prefill, decode, load, each kernel), for people who would rather look than read.
matplotlib is optional (the ``bench`` extra); without it the plots are skipped with a clear message."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

from .environment import slug
from .report import Record, hardware, model_name

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_record(record: Record, record_path: Path) -> list[Path]:
    """Write ``<record stem>-<benchmark>.png`` beside the record; returns the files written."""
    plt = _pyplot()
    if plt is None:
        logger.warning("matplotlib is not installed: no plots (pip install 'llama-core[bench]')")
        return []
    written = []
    subtitle = hardware(record)
    for m in record["models"]:
        name = model_name(m)
        stem = slug(name.removesuffix(".gguf"))
        for bench, draw in (("prefill", _prefill), ("decode", _decode), ("load", _load)):
            rows = m.get(bench)
            if not rows:
                continue
            fig, _ = draw(plt, rows)
            title = f"{name} {bench} ({m['settings']['dtype']})\n{subtitle}"
            written.append(_save(plt, fig, title, record_path.with_name(f"{record_path.stem}-{stem}-{bench}.png")))
    for name, rows in record.get("kernels", {}).items():
        if rows:
            fig, ax = plt.subplots(figsize=(8, 4))
            labels = [f"{r['impl']}\n{r['mode']}\n{r.get('tokens', '')}" for r in rows]
            ax.bar(range(len(rows)), [r["gbps"] for r in rows])
            ax.set_xticks(range(len(rows)), labels, fontsize=6)
            ax.set_ylabel("GB/s")
            written.append(_save(plt, fig, f"kernel {name}\n{subtitle}",
                                 record_path.with_name(f"{record_path.stem}-kernel-{name}.png")))
    return written


def _save(plt: Any, fig: Any, title: str, path: Path) -> Path:
    # the hardware line outgrows a figure's width: wrap it at about as many characters as fit
    width = int(fig.get_figwidth() * 13)
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=9)
    # a figure legend sits below the axes (eight series would cover the bars inside them)
    fig.tight_layout(rect=(0, 0.06 * _legend_rows(fig), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend_rows(fig: Any) -> int:
    return sum(-(-len(legend.get_texts()) // _LEGEND_COLUMNS) for legend in fig.legends)


_LEGEND_COLUMNS = 4


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=_LEGEND_COLUMNS, fontsize=8, frameon=False)


# One colour per implementation in every plot of every record (the default cycle would follow row order).
_COLORS = {"llama_core eager": "tab:blue", "llama_core compiled": "tab:green", "llama_core compiled-frozen": "tab:orange",
           "llama_core int8-weight-only": "tab:red", "llama_core int8-weight-only-compiled": "tab:purple",
           "transformers eager": "tab:brown", "transformers static+compile": "tab:olive", "llama_cpp f32": "tab:pink",
           "llama_cpp bf16": "tab:pink", "llama_cpp f16": "tab:pink", "llama_cpp q8_0": "tab:gray"}


def _color(name: str) -> str:
    return _COLORS.get(name, "tab:cyan")


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(f"{r['impl']} {r['mode']}", []).append(r)
    return out


def _prefill(plt: Any, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for name, sel in _series(rows).items():
        x = [r["tokens"] for r in sel]
        axes[0].plot(x, [r["tok_s"] for r in sel], marker="o", label=name, color=_color(name))
        axes[1].plot(x, [r["tflops"] for r in sel], marker="o", label=name, color=_color(name))
    for ax, label in zip(axes, ("tokens/s", "TFLOP/s"), strict=True):
        ax.set(xscale="log", xlabel="prompt tokens", ylabel=label)
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    return fig, axes


def _decode(plt: Any, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    series = _series(rows)
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(len(series), 1)
    for i, (name, sel) in enumerate(series.items()):
        by_batch = {r["batch"]: r for r in sel}
        # bars only where the library ran (llama.cpp: batch 1); None (drowned in noise) -> 0
        xs = [j + i * width for j, b in enumerate(batches) if b in by_batch]
        axes[0].bar(xs, [by_batch[b].get("tok_s") or 0 for b in batches if b in by_batch], width, label=name,
                    color=_color(name))
        axes[1].bar(xs, [by_batch[b].get("frac_copy_bw") or 0 for b in batches if b in by_batch], width,
                    label=name, color=_color(name))
    for ax, label in zip(axes, ("tokens/s", "fraction of copy bandwidth"), strict=True):
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes[0])
    return fig, axes


def _load(plt: Any, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    names = [r["impl"] for r in rows]
    axes[0].bar(names, [r["median_s"] for r in rows])
    axes[0].set_ylabel("load time (s)")
    axes[1].bar(names, [(r["added_rss_bytes"] or 0) / 2**20 for r in rows], label="added by load")
    axes[1].set_ylabel("peak RSS added (MB)")
    return fig, axes
