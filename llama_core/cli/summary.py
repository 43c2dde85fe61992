"""``llama-core summary``: a model's shape and parameter count, and the time of one forward pass."""

from __future__ import annotations

import argparse
import time

from .._version import __version__
from ..modeling.presets import preset_names

EXAMPLES = """examples:
  llama-core summary --preset llama3-8b
  llama-core summary --model TinyLlama/TinyLlama-1.1B-Chat-v1.0
"""


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def cmd_summary(args: argparse.Namespace) -> int:
    """Build (preset) or load (checkpoint) a model, print its shape, and time one forward pass."""
    # Here, not at the top: building the parser (--help, argument errors) must not wait for torch.
    import torch

    from ..modeling.config import LlamaConfig
    from ..modeling.model import LlamaForCausalLM

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype or "auto", device=args.device)
        source = args.model
    else:
        dtype = args.dtype or "float32"
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig.from_preset(args.preset)).to(getattr(torch, dtype)).eval()
        source = f"preset {args.preset} (random weights)"
    build_s = time.perf_counter() - t0
    c = model.config
    print(f"llama-core {__version__}  torch {torch.__version__}  device {args.device}")
    print(f"model      {source}")
    print(f"shape      {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads {c.num_attention_heads} "
          f"(kv {c.num_key_value_heads}, head_dim {c.head_dim}), mlp {c.intermediate_size}, vocab {c.vocab_size}")
    print(f"rope       {c.rope_type}, theta {c.rope_theta:g}, max positions {c.max_position_embeddings}"
          + (", tied embeddings" if c.tie_word_embeddings else ""))
    print(f"parameters {_human(model.num_parameters())} ({_human(model.num_parameters(exclude_embeddings=True))} "
          f"without embeddings), {_human(model.get_memory_footprint(), 'B')} in {model.dtype}")
    print(f"built in   {build_s:.2f} s")

    ids = torch.randint(0, c.vocab_size, (args.batch, args.seq_len), device=args.device)
    with torch.inference_mode():
        model(ids[:, :2])  # warm-up
        t0 = time.perf_counter()
        out = model(ids)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    tokens = args.batch * args.seq_len
    flops = model.floating_point_ops(tokens, seq_len=args.seq_len, training=False)
    print(f"forward    batch {args.batch} x {args.seq_len} tokens in {dt * 1000:.1f} ms: "
          f"{tokens / dt:,.0f} tokens/s, {_human(flops / dt, 'FLOP/s')}; logits {tuple(out.logits.shape)}, "
          f"finite: {bool(torch.isfinite(out.logits).all())}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("summary", help="print a model's shape and time a forward pass", epilog=EXAMPLES)
    src = s.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", choices=preset_names(), help="random-init model of this shape")
    src.add_argument("--model", help="checkpoint directory or hub id")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 / config's")
    s.add_argument("--device", default="cpu")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_summary)
