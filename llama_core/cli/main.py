"""The ``llama-core`` entry point: one sub-command per module of this package."""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from . import bench, chat, convert, generate, summary, train

# The sub-commands in the order ``llama-core --help`` lists them; each module has ``add_parser(sub)``.
COMMANDS = (summary, generate, chat, bench, train, convert)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, where it has one worth showing (not None/False, and not already
    said in the help text)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # A command's examples (its epilog) keep their lines; other prose is wrapped as usual.
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every command's parser: no silent abbreviations (``--max-new-token 5`` is an error, not a guess) and
    defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llama-core", description="Llama decoder in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"llama-core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
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
    except KeyboardInterrupt:  # writers are atomic: an interrupted command leaves nothing half-written
        print("\nllama-core: interrupted", file=sys.stderr)
        return 130

