"""The ``llama-core`` entry point: one sub-command per module of this package."""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from . import bench, chat, convert, generate, summary, train

# The sub-commands in the order ``llama-core --help`` lists them; each module has ``add_parser(sub)``.
COMMANDS = (summary, generate, chat, bench, train, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-core", description="Llama decoder in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"llama-core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"llama-core: error: {e}", file=sys.stderr)
        return 2

