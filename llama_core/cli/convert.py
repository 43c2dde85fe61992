"""``llama-core convert``: the checkpoint conversions of ``checkpoints_convert`` (also ``python -m checkpoints_convert``)."""

from __future__ import annotations

import argparse

from checkpoints_convert.cli import add_arguments, run


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert checkpoints between Meta, llama2.c and HF formats")
    add_arguments(c)
    c.set_defaults(func=run)
