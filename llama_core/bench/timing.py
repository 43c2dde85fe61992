"""Timing and memory primitives shared by every benchmark: synced wall-clock timing, interleaved
side-by-side comparisons, peak memory (CUDA allocator or process RSS) and the device's copy bandwidth.

Why interleaved: on a shared or thermally throttling machine the speed drifts within seconds, so timing
all repeats of A and then all of B biases the ratio. Each repeat runs every candidate once, in a rotated
order, and the ratio reported is the median of the per-repeat ratios.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
# One measurement of an op sweep: a dict with at least ``impl``, ``mode`` and ``ms`` (kernels, int8).
Row = dict[str, Any]


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a host timer measures the device too."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds for one call of ``fn``, device work included (sync before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_op(fn: Callable[[], object], device: str, repeats: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds: ``triton.testing.do_bench`` on CUDA (L2 flushed between calls),
    else ``repeats`` wall-clock calls after a warm-up (CPU runs are interpreter smoke tests, not speeds)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def quantiles(times: list[float]) -> dict[str, float]:
    """Median with 20th / 80th percentiles (equal to the median for fewer than two samples)."""
    med = statistics.median(times)
    if len(times) < 2:
        return {"median_s": med, "p20_s": med, "p80_s": med}
    q = statistics.quantiles(times, n=5, method="inclusive")
    return {"median_s": med, "p20_s": q[0], "p80_s": q[3]}


@dataclass
class Comparison:
    """Per-candidate times from :func:`interleaved` runs."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, slower: str, faster: str) -> float:
        """Median over repeats of ``time[slower] / time[faster]`` (> 1: ``faster`` is faster)."""
        return statistics.median(self.ratios(slower, faster))

    def ratios(self, slower: str, faster: str) -> list[float]:
        """``time[slower] / time[faster]`` of each repeat: their spread is the ratio's noise."""
        return [a / b for a, b in zip(self.times[slower], self.times[faster], strict=True)]


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int,
                warmup: int = 1, on_repeat: Callable[[], None] | None = None) -> Comparison:
    """Time every candidate ``repeats`` times, one call of each per round, rotating who goes first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    result = Comparison({name: [] for name in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result.times[name].append(time_call(fns[name], device))
        if on_repeat is not None:
            on_repeat()
    return result


def spread(ratios: list[float]) -> list[float] | None:
    """[min, max] of per-repeat ratios (None without any): a target inside it is not told apart from noise."""
    values = [r for r in ratios if r > 0]  # a decode difference drowned in noise gives no ratio
    return [min(values), max(values)] if values else None


class PeakMemory:
    """Peak memory while the block runs, in bytes: the CUDA allocator's peak on a GPU, else the process's
    peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).

    ``peak`` is absolute; ``added`` subtracts what was in use on entry (the resident weights), so it is
    the working memory of the block (activations, KV cache, temporaries). None where unmeasurable.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak: int | None = None
        self.added: int | None = None

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_kb("VmHWM")
        if self.peak is not None and self._base is not None:
            self.added = self.peak - self._base


def _status_kb(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None off Linux)."""
    return _status_kb("VmRSS")


def reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); returns the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return current_rss()


def peak_rss() -> int | None:
    """Peak resident set size of this process in bytes since start or the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM")


def copy_bandwidth(device: torch.device | str, nbytes: int, repeats: int = 5) -> float:
    """Achieved bytes/s of a large device-to-device tensor copy (read + write counted), the practical
    ceiling for memory-bound work such as one-token decoding. Median of ``repeats`` after a warm-up."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_call(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * n * 4 / statistics.median(times)
