"""What ``llama-core generate`` and ``llama-core chat`` share: the options naming the model, how to sample and
where to run, their checks, and loading the model and tokenizer they name."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the model are imported inside the functions that run a command: building the parser (--help,
# argument errors) must not wait for torch (seconds on a loaded machine).
if TYPE_CHECKING:
    from ..modeling.model import LlamaForCausalLM
    from ..tokenizer import Tokenizer

def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, .gguf file, Meta directory or llama2.c .bin")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (per reply in chat)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the most likely tokens whose probabilities add up to this (1 = all)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh one each run)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="what the model computes in (auto: the checkpoint's dtype)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--quantize", choices=["int8", "int8-weight-only"],
                   help="quantise the linear layers while loading (see llama_core.quant)")


# On a CPU the compiled one-token step (one-row products as inductor reductions, modeling.linear) decodes
# 2.2-3x faster than eager, but compiling takes 25-40 s the first time (3-9 s from inductor's cache) on a 2-core
# EPYC with SmolLM2-135M: worth it from a few hundred new tokens.
COMPILE_MIN_NEW_TOKENS = 256


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=f"compile the one-token decode step (default: on a CPU when --max-new-tokens is at least "
                        f"{COMPILE_MIN_NEW_TOKENS}; the compile time is reported apart)")


def resolve_device(device: str | None) -> str:
    """``--device`` as given, or when omitted cuda if this torch sees a GPU, else cpu. Resolved when the
    command runs, not as the option's default: asking torch at parse time would import it for --help."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def should_compile(args: argparse.Namespace) -> bool:
    import torch

    if args.compile is not None:
        return args.compile
    return torch.device(resolve_device(args.device)).type == "cpu" and args.max_new_tokens >= COMPILE_MIN_NEW_TOKENS


def check_device(device: str) -> None:
    """A device this torch can use, said in one line before anything loads."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {device}: CUDA is not available (this torch {torch.__version__} is {build})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def check_model_path(model: str) -> None:
    """A local path that does not exist is named as such (not reported later as a missing tokenizer); a
    name shaped like a hub id (``org/name``) is left to the hub."""
    path = Path(model).expanduser()
    if path.exists():
        return
    parts = model.split("/")
    looks_like_hub_id = len(parts) == 2 and all(parts) and not model.startswith((".", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"--model {model}: no such file or directory (nor a hub id of the form org/name)")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model and tokenizer ``args`` name. Sets ``args.device`` to the device used (``--device`` omitted:
    cuda if available, else cpu), so what runs after the load sees where the model is."""
    import torch

    from ..model_io.gguf_file import find_gguf
    from ..modeling.model import LlamaForCausalLM
    from ..tokenizer import Tokenizer

    args.device = resolve_device(args.device)
    check_device(args.device)
    check_model_path(args.model)
    tokenizer_source = args.tokenizer or args.model
    if args.tokenizer is None and Path(args.model).is_file() and find_gguf(args.model) is None:
        raise ValueError(f"{args.model} is a single weights file; pass --tokenizer (e.g. a sentencepiece .model)")
    tokenizer = Tokenizer.from_pretrained(tokenizer_source)
    dtype = args.dtype
    cpu = torch.device(args.device).type == "cpu"
    if dtype == "auto" and args.quantize == "int8-weight-only" and cpu and should_compile(args):
        # int8 weights either way; fp32 activations are what inductor's CPU reduction runs at full speed
        # (with bf16 activations it falls back to narrow int8 loads: 2.3x slower on SmolLM2). Eagerly the
        # checkpoint's dtype stays: PyTorch's int8 kernel is the slow one with fp32 activations.
        dtype = "float32"
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device, quantize=args.quantize)
    return model, tokenizer


def check_sampling(args: argparse.Namespace) -> None:
    # Checked before the (possibly long) model load, so a typo costs nothing.
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.max_new_tokens < 0:
        raise ValueError("--top-k and --max-new-tokens must be >= 0")
