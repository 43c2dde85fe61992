"""``llama-core bench``: the benchmark suite from the command line (see ``llama_core.bench``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..modeling.presets import preset_names

# Results go here unless --output says otherwise: never into the repository's committed records by default,
# so running the README's main job leaves a checkout clean (the folder is in .gitignore).
DEFAULT_OUTPUT = "bench-results"


EXAMPLES = """examples:
  llama-core bench --quick
  llama-core bench --model SmolLM2-135M-Instruct.Q4_1.gguf --dtype bfloat16 --compile --threads 2
  llama-core bench --markdown bench-results/bench-synthetic-100m-amd-epyc.json
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark llama_core against transformers and llama.cpp on the same weights",
                       epilog=EXAMPLES,
                       description="Prefill, decode, load and kernel benchmarks of random-weight Llama-shaped "
                       "models (--preset) or real weights (--model), side by side with transformers and, on a CPU "
                       "where the llama_cpp binding imports, llama.cpp, in one run. Prints a table, writes a JSON "
                       "record and PNG plots. Defaults suit the device found (CPU: synthetic-100m in fp32).")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under 2 minutes on a 2-core CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--preset", action="append", choices=preset_names(), help="model shape (repeatable)")
    p.add_argument("--model", action="append", metavar="PATH",
                   help="real weights instead of a preset: an HF checkpoint directory or a GGUF file (repeatable; "
                   "with --preset, both are run)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="what every library computes in (a quantised GGUF is dequantised into it)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (a shallower model, same width)")
    p.add_argument("--prompt-lens", type=_ints, help="prefill prompt lengths, e.g. 128,512,2048")
    p.add_argument("--decode-tokens", type=int, help="new tokens per generate call")
    p.add_argument("--decode-prompt-len", type=int)
    p.add_argument("--batch-sizes", type=_ints, help="decode batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time llama_core compiled (and transformers static cache + compile on GPU)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                   help="also llama_core int8-weight-only, beside llama.cpp Q8_0 (default: on for --model on a CPU)")
    p.add_argument("--threads", type=int, help="torch threads, and llama.cpp's (default: torch's default)")
    p.add_argument("--no-transformers", action="store_true", help="no transformers side")
    p.add_argument("--no-llama-cpp", action="store_true", help="no llama.cpp side (it runs on a CPU where the "
                   "llama_cpp binding imports)")
    p.add_argument("--no-load", action="store_true", help="skip the checkpoint load benchmark")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="op microbenchmarks (default: on CUDA only)")
    p.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT),
                   help=f"directory for record and plots (default: {DEFAULT_OUTPUT}/ in the current directory, "
                   "git-ignored in a llama-core checkout; the repository's records are written with --output "
                   "benchmarks/results)")
    p.add_argument("--no-record", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--markdown", type=Path, metavar="RECORD.json",
                   help="print README markdown tables of a recorded result and exit (runs nothing)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    # Here, not at the top: building the parser (--help, argument errors) must not wait for torch.
    import torch

    from .. import bench

    if args.markdown:
        sys.stdout.write(bench.render_markdown(bench.load_record(args.markdown)))
        return 0
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.decode_tokens is not None and args.decode_tokens < 2:  # decode speed = t(n) - t(1) over n - 1 steps
        raise ValueError(f"--decode-tokens must be >= 2, got {args.decode_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or bench.default_device()
    settings = bench.default_settings(device, args.quick)
    if args.preset or args.model:  # the device's defaults, for each named shape and each checkpoint
        for path in args.model or []:
            if not Path(path).expanduser().exists():
                raise FileNotFoundError(f"--model {path}: no such file or directory")
        cpu = torch.device(device).type == "cpu"
        settings = ([dataclasses.replace(settings[0], preset=name) for name in args.preset or []]
                    + [dataclasses.replace(settings[0], preset=None, model=path, int8=cpu and not args.quick)
                       for path in args.model or []])
    overrides = {"dtype": args.dtype, "layers": args.layers, "prompt_lens": args.prompt_lens,
                 "decode_tokens": args.decode_tokens, "decode_prompt_len": args.decode_prompt_len,
                 "batch_sizes": args.batch_sizes, "repeats": args.repeats, "compile": args.compile,
                 "int8": args.int8}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_transformers:
        overrides["transformers"] = False
    if args.no_llama_cpp:
        overrides["llama_cpp"] = False
    if args.no_load:
        overrides["load"] = False
    settings = [dataclasses.replace(s, **overrides) for s in settings]
    if any(s.transformers for s in settings):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("transformers is not installed: pip install 'llama-core[bench]', "
                             "or pass --no-transformers") from None
    record = bench.run_bench(settings, kernels=args.kernels, quick=args.quick)
    print(bench.format_table(record))
    if not args.no_record:
        path = bench.write_record(record, args.output)
        print(f"\nrecord: {path}")
        if not args.no_plot:
            from ..bench.plot import plot_record

            for png in plot_record(record, path):
                print(f"plot:   {png}")
    return 0
