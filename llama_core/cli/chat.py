"""``llama-core chat``: an interactive multi-turn conversation through the model's chat template."""

from __future__ import annotations

import argparse
import sys

import torch

from ..generation.sampling import LogitsSettings, process_logits, sample
from ..generation.session import CACHE_BUCKET, Session
from .generation_options import (
    add_compile_argument,
    add_generation_arguments,
    check_sampling,
    load_model_and_tokenizer,
    should_compile,
)


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn loop. The KV cache is kept across turns: each turn re-renders the chat template, keeps
    the cache for the longest prefix it shares with what was fed so far, and feeds only the rest (templates
    such as Llama 2's re-tokenise earlier turns, so the shared prefix can end before the last reply)."""
    check_sampling(args)
    model, tok = load_model_and_tokenizer(args)
    settings = LogitsSettings(do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                              top_p=args.top_p, top_k=args.top_k)
    generator = torch.Generator(model.device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    stops = set(tok.stop_ids) | set(model.config.eos_token_ids)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    session = Session(model, compile=should_compile(args))
    if session.compile:
        sys.stderr.write("the decode step compiles at the first reply and at each new cache size (every "
                         f"{CACHE_BUCKET} tokens of conversation; --no-compile skips it)\n")
    sys.stderr.write("llama-core chat: an empty line or Ctrl-D ends the session\n")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(f"the conversation ({len(ids)} tokens) plus --max-new-tokens no longer fits the "
                             f"model's {model.config.max_position_embeddings} positions")
        logits = session.feed(ids, room=args.max_new_tokens)
        reply: list[int] = []
        decoder = tok.incremental_decoder(skip_special_tokens=True)
        for _ in range(args.max_new_tokens):
            scores = process_logits(logits[None], settings)
            token = int(sample(scores.softmax(-1), generator) if settings.do_sample else scores.argmax(-1))
            logits = session.push(token)  # fed, so the next turn's template can reuse it
            if token in stops:
                break
            reply.append(token)
            sys.stdout.write(decoder.add([token]))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    add_generation_arguments(c)
    c.add_argument("--system", help="system prompt")
    add_compile_argument(c)
    c.set_defaults(func=cmd_chat)
