"""One PNG of a GPU check: kernel bandwidth against the copy ceiling, int8 GEMM speedups over cuBLAS bf16 by M,
and end-to-end decode tokens/s. A picture of the rows in gpu-check.json, nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = dict[str, Any]


def plot(rows: list[Row], path: Path, title: str) -> Path | None:
    """Write the figure; None (nothing written) without matplotlib or without any row to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kernels = [r for r in rows if r.get("kind") in ("rms_norm", "rope")]
    gemm = [r for r in rows if r.get("kind") == "int8_matmul" and r.get("speedup_vs_dense")]
    decode = [r for r in rows if r.get("kind") == "e2e_decode" and r.get("tok_s")]
    if not (kernels or gemm or decode):
        return None
    fig, (ax_k, ax_g, ax_d) = plt.subplots(1, 3, figsize=(18, 5))
    copy = [r["gb_s"] for r in rows if r.get("kind") == "copy_bandwidth"]
    labels = [f"{r['kind']} {r['mode']}\n{r['impl']}" for r in kernels]
    ax_k.barh(labels, [r["gbps"] for r in kernels])
    if copy:
        ax_k.axvline(max(copy), color="red", lw=1, label=f"copy {max(copy):.0f} GB/s")
        ax_k.legend()
    ax_k.set(xlabel="GB/s", title="memory-bound kernels")
    ax_k.tick_params(axis="y", labelsize=6)
    for key in dict.fromkeys((r["impl"], r["k"], r["n"]) for r in gemm):
        pts = sorted((r["m"], r["speedup_vs_dense"]) for r in gemm if (r["impl"], r["k"], r["n"]) == key)
        ax_g.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=f"{key[0]} {key[1]}x{key[2]}")
    ax_g.axhline(1.0, color="gray", lw=0.8)
    ax_g.set(xscale="log", xlabel="M (rows)", ylabel="speedup vs cuBLAS bf16", title="int8 GEMMs")
    if gemm:
        ax_g.legend(fontsize=5, ncol=2)
    names = [f"{r['preset']} b{r['batch']}\n{r['impl']}/{r['mode']}" for r in decode]
    ax_d.barh(names, [r["tok_s"] for r in decode])
    ax_d.set(xlabel="tokens/s", title="decode")
    ax_d.tick_params(axis="y", labelsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
