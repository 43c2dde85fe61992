"""The op microbenchmarks ``llama-core bench`` runs on a GPU: name -> ``fn(quick, device) -> rows``.

Each entry is one sweep (``kernels`` for RMSNorm and RoPE, ``int8`` for the int8 GEMMs); rows are dicts with
at least ``impl``, ``mode`` and ``ms``. To add an op, write its sweep (timing it with
:func:`llama_core.bench.timing.time_op`) and register it here with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .int8 import M_VALUES, int8_matmul_rows
from .kernels import rms_norm_rows, rope_rows
from .timing import Row

logger = logging.getLogger(__name__)
KernelBenchmark = Callable[[bool, str], list[Row]]

KERNEL_BENCHMARKS: dict[str, KernelBenchmark] = {
    # quick: the 8B-shaped sizes that matter most; full: the sweeps the benchmark scripts run by default.
    "rms_norm": lambda quick, device: rms_norm_rows(
        device, hidden=(4096,) if quick else (1024, 2048, 4096, 8192, 16384), tokens=(16384,) if quick else (4096, 16384)),
    "rope": lambda quick, device: rope_rows(device, tokens=(16384,) if quick else (1024, 4096, 16384)),
    "int8_matmul": lambda quick, device: _int8_matmul_rows(quick, device),
}


def _int8_matmul_rows(quick: bool, device: str) -> list[Row]:
    return int8_matmul_rows(device, m_values=(1, 16, 512, 4096) if quick else M_VALUES)


def run_kernel_benchmarks(device: str, quick: bool, names: Sequence[str] | None = None,
                          progress: Callable[[str], None] | None = None) -> dict[str, list[Row]]:
    """Run the registered op benchmarks (all, or ``names``); a failing one is logged and recorded empty."""
    results: dict[str, list[Row]] = {}
    for name in names or list(KERNEL_BENCHMARKS):
        if progress is not None:
            progress(f"kernel {name}")
        try:
            results[name] = KERNEL_BENCHMARKS[name](quick, device)
        except Exception as e:  # one broken op must not lose the whole run's record
            logger.error("kernel benchmark %s failed: %s", name, e)
            results[name] = []
    return results
