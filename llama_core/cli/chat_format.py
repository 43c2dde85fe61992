"""Which chat format ``llama-core chat`` and ``generate --chat`` use: the model's own template, Llama 3's
header format where the tokenizer has its special tokens, or what ``--chat-template`` names. A tokenizer with
neither is refused rather than given a guessed format (transformers refuses too): a base model or a model of
another family would otherwise be prompted in Llama 2's ``[INST]`` format without a word."""

from __future__ import annotations

import argparse
from pathlib import Path

BUILT_IN = ("llama2", "llama3", "chatml")
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a few KB; a bigger "template" file is a mistake


def add_chat_template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", metavar="FORMAT_OR_FILE",
                   help=f"chat format when the model has no template of its own (or to replace it): "
                        f"{', '.join(BUILT_IN)}, or a Jinja file")


def choose_chat_format(tok, choice: str | None, model: str) -> None:
    """Make ``tok`` use the chosen chat format, or raise ValueError if the model has none and none was
    chosen. ``tok`` is a llama_core Tokenizer (its ``chat_template`` is the Jinja text it uses, or None for
    the built-in formats)."""
    from ..tokenizer.chat_template import CHATML_TEMPLATE, LLAMA3_HEADER_TOKENS

    llama3 = all(name in tok.backend.special_tokens for name in LLAMA3_HEADER_TOKENS)
    if choice is None:
        if tok.chat_template is None and not llama3:
            raise ValueError(f"{model} has no chat template; pass --chat-template with one of "
                             f"{', '.join(BUILT_IN)} or a Jinja file (or run without chat)")
        return
    if choice == "llama3":
        if not llama3:
            raise ValueError(f"--chat-template llama3: the tokenizer of {model} lacks Llama 3's header tokens")
        tok.chat_template = None
    elif choice == "llama2":
        if llama3:
            raise ValueError(f"--chat-template llama2: the tokenizer of {model} has Llama 3's header tokens; "
                             "use --chat-template llama3")
        if tok.bos_id is None or tok.eos_id is None:
            raise ValueError(f"--chat-template llama2 needs BOS and EOS tokens, which the tokenizer of {model} lacks")
        tok.chat_template = None
    elif choice == "chatml":
        tok.chat_template = CHATML_TEMPLATE
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template {choice}: neither a built-in format ({', '.join(BUILT_IN)}) "
                                    "nor a file")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ValueError(f"--chat-template {choice}: {path.stat().st_size:,} bytes is not a chat template")
        tok.chat_template = path.read_text(encoding="utf-8")
