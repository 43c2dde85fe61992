"""``llama-core bench``: llama_core side by side with transformers on the same random weights, in one run.

Modules, one concept each: ``timing`` (synced, interleaved timing; peak memory; copy bandwidth), ``setup``
(settings per device; the model pair, checked equal), ``prefill``, ``decode``, ``loading`` (subprocess per
load), ``kernels`` (op microbenchmark registry), ``environment``, ``targets``, ``report`` (JSON record,
table, markdown), ``plot`` and ``run`` (the whole run).

    from llama_core.bench import default_settings, run_bench, format_table
    record = run_bench(default_settings("cpu", quick=True), quick=True)
    print(format_table(record))
"""

from .kernels import KERNEL_BENCHMARKS, run_kernel_benchmarks
from .report import format_table, load_record, render_markdown, write_record
from .run import run_bench
from .setup import BenchSettings, default_device, default_settings

__all__ = ["KERNEL_BENCHMARKS", "BenchSettings", "default_device", "default_settings", "format_table",
           "load_record", "render_markdown", "run_bench", "run_kernel_benchmarks", "write_record"]
