"""``llama-core convert``: the checkpoint conversions of ``checkpoints_convert`` (also ``python -m checkpoints_convert``)."""

from __future__ import annotations

import argparse

from checkpoints_convert.cli import add_arguments, run

EXAMPLES = """examples:
  llama-core convert llama2c-to-hf --input stories260K.bin --output stories/ --tokenizer tok512.model
  llama-core convert gguf-to-hf --input SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2-hf/
  llama-core convert hf-to-gguf --input smollm2-hf/ --output smollm2-q8_0.gguf --dtype q8_0
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert checkpoints between Meta, llama2.c, GGUF and HF formats",
                       epilog=EXAMPLES)
    add_arguments(c)
    c.set_defaults(func=run)
