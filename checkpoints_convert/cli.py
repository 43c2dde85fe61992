"""``python -m checkpoints_convert`` / ``llama-core convert``: the conversions from the command line."""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS = ("meta-to-hf", "hf-to-meta", "llama2c-to-hf", "reshard", "hf-to-gguf", "gguf-to-hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", choices=COMMANDS, help="which conversion")
    parser.add_argument("--input", required=True,
                        help="input directory (.bin file for llama2c-to-hf, .gguf file for gguf-to-hf)")
    parser.add_argument("--output", required=True,
                        help="output directory (a .gguf file for hf-to-gguf), written atomically")
    parser.add_argument("--dtype", help="cast floating-point tensors: float32, bfloat16, float16; hf-to-gguf: "
                        "the GGUF tensor type, f32 (default), f16, bf16 or q8_0")
    parser.add_argument("--num-shards", type=int, default=1, help="hf-to-meta: model-parallel ranks")
    parser.add_argument("--max-shard-size", default="5GB", help="HF outputs: e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--embedding-split-dim", type=int, choices=(0, 1),
                        help="hf-to-meta: shard the embedding by rows (0, Llama 3) or columns (1, Llama 1/2)")
    parser.add_argument("--max-position-embeddings", type=int, help="meta-to-hf: override the context length")
    parser.add_argument("--tokenizer", help="llama2c-to-hf: a sentencepiece .model to copy in; hf-to-gguf: the "
                        "tokenizer file or directory to embed (default: the input's)")
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--tie-embeddings", dest="tie", action="store_true", default=None,
                     help="reshard: drop lm_head.weight (it must equal the embedding)")
    tie.add_argument("--untie-embeddings", dest="tie", action="store_false",
                     help="reshard: write lm_head.weight as a copy of the embedding")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from . import convert

    progress = not args.no_progress
    try:
        if args.command == "meta-to-hf":
            out = convert.meta_to_hf(args.input, args.output, args.dtype, args.max_shard_size, args.force,
                                     args.max_position_embeddings, progress)
        elif args.command == "hf-to-meta":
            out = convert.hf_to_meta(args.input, args.output, args.num_shards, args.dtype, args.force,
                                     args.embedding_split_dim, progress)
        elif args.command == "llama2c-to-hf":
            out = convert.llama2c_to_hf(args.input, args.output, args.dtype, args.max_shard_size, args.force,
                                        args.tokenizer, progress)
        elif args.command == "hf-to-gguf":
            out = convert.hf_to_gguf(args.input, args.output, args.dtype or "f32", args.force, args.tokenizer, progress)
        elif args.command == "gguf-to-hf":
            out = convert.gguf_to_hf(args.input, args.output, args.dtype, args.max_shard_size, args.force, progress)
        else:
            out = convert.reshard(args.input, args.output, args.max_shard_size, args.dtype, args.tie, args.force,
                                  progress)
    except (ValueError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert",
                                     description="Convert Llama checkpoints between Meta, llama2.c and HF formats.")
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run(parser.parse_args(argv))
