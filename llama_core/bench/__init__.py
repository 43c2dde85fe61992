"""``llama-core bench``: llama_core side by side with transformers and llama.cpp on the same weights (random
presets or a real checkpoint), in one run.

Modules, one concept each: ``timing`` (synced, interleaved timing; op timing; peak memory; copy bandwidth),
``setup`` (settings per device; the models, checked equal), ``prompts`` (the token ids every library gets),
``llamacpp`` (llama.cpp's side: its GGUF, driving the binding), ``prefill``, ``decode``, ``loading``
(subprocess per load), ``kernels`` and ``int8`` (op sweeps), ``kernel_registry`` (the sweeps a run
includes), ``environment``, ``targets``, ``report`` (JSON record, table, markdown), ``plot``, ``progress``
(named stages with elapsed time and time left) and ``run`` (the whole run).

May import: every other package of llama_core (the model, generation, quant, kernels, tokenizer),
checkpoints_convert (GGUF writing), transformers, matplotlib (the ``bench`` extra) and ``llama_cpp`` (never a
dependency), the last three imported where used. Only the CLI imports this package.

    from llama_core.bench import default_settings, run_bench, format_table
    record = run_bench(default_settings("cpu", quick=True), quick=True)
    print(format_table(record))
"""

from .kernel_registry import KERNEL_BENCHMARKS, run_kernel_benchmarks
from .report import format_table, load_record, render_markdown, write_record
from .run import run_bench
from .setup import BenchSettings, default_device, default_settings

__all__ = ["KERNEL_BENCHMARKS", "BenchSettings", "default_device", "default_settings", "format_table",
           "load_record", "render_markdown", "run_bench", "run_kernel_benchmarks", "write_record"]
