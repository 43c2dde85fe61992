"""``llama-core chat``: an interactive multi-turn conversation through the model's chat template."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..generation.sampling import LogitsSettings
    from ..generation.session import Session
from .chat_format import add_chat_template_argument, choose_chat_format
from .generation_options import (
    add_compile_argument,
    add_generation_arguments,
    check_sampling,
    load_model_and_tokenizer,
    should_compile,
)

EXAMPLES = """examples:
  llama-core chat --model SmolLM2-135M-Instruct.Q4_1.gguf --system "You are terse."
  llama-core chat --model stories/ --chat-template llama2 --max-new-tokens 64
"""


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn loop. The KV cache is kept across turns: each turn re-renders the chat template, keeps
    the cache for the longest prefix it shares with what was fed so far, and feeds only the rest (templates
    such as Llama 2's re-tokenise earlier turns, so the shared prefix can end before the last reply).
    Ctrl-C stops a reply and returns to the prompt; at the prompt it (or ``/exit``, an empty line, Ctrl-D)
    ends the session; ``/reset`` starts a new conversation."""
    import torch

    from ..generation.sampling import LogitsSettings
    from ..generation.session import CACHE_BUCKET, Session

    check_sampling(args)
    model, tok = load_model_and_tokenizer(args)
    choose_chat_format(tok, args.chat_template, args.model)
    positions = model.config.max_position_embeddings
    if args.max_new_tokens >= positions:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's "
                         f"{positions} positions")
    settings = LogitsSettings(do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                              top_p=args.top_p, top_k=args.top_k)
    generator = torch.Generator(model.device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    stops = set(tok.stop_ids) | set(model.config.eos_token_ids)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    session = Session(model, compile=should_compile(args))
    if session.compile:
        sys.stderr.write("the decode step compiles at the first reply and at each new cache size (every "
                         f"{CACHE_BUCKET} tokens of conversation; --no-compile skips it)\n")
    sys.stderr.write("llama-core chat: /reset starts over; /exit, an empty line, Ctrl-D or Ctrl-C at the prompt "
                     "ends the session; Ctrl-C during a reply stops it\n")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            break
        if not line.strip() or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(system)
            sys.stderr.write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit(tok, messages, len(system), positions - args.max_new_tokens)
        if ids is None:
            messages.pop()
            sys.stderr.write(f"llama-core: this message alone does not fit the model's {positions} positions "
                             f"with --max-new-tokens {args.max_new_tokens}; try a shorter one\n")
            continue
        reply, seconds = _reply(session, ids, args.max_new_tokens, tok, stops, settings, generator)
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
        if reply and seconds > 0:
            sys.stderr.write(f"[{len(reply)} tokens, {len(reply) / seconds:.1f} tokens/s]\n")
    return 0


def _fit(tok, messages: list[dict], keep: int, budget: int) -> list[int] | None:
    """The conversation's prompt ids, dropping the oldest turns after the first ``keep`` messages (the system
    prompt) until it fits ``budget`` tokens; None if even the last message alone does not fit."""
    while True:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
        if len(messages) - keep <= 1:
            return None
        del messages[keep:keep + 2]  # the oldest user turn and the reply to it
        sys.stderr.write("(the oldest turn was dropped to fit the model's context)\n")


def _reply(session: Session, ids: list[int], max_new_tokens: int, tok, stops: set[int], settings: LogitsSettings,
           generator: torch.Generator) -> tuple[list[int], float]:
    """Stream one reply; Ctrl-C stops it early (what was said so far stays the reply). Returns the reply's
    ids and the seconds spent decoding them."""
    from ..generation.sampling import process_logits, sample

    reply: list[int] = []
    decoder = tok.incremental_decoder(skip_special_tokens=True)
    start = time.perf_counter()
    try:
        logits = session.feed(ids, room=max_new_tokens)
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            scores = process_logits(logits[None], settings)
            token = int(sample(scores.softmax(-1), generator) if settings.do_sample else scores.argmax(-1))
            if token in stops:
                session.push(token)  # fed, so the next turn's template can reuse it
                break
            reply.append(token)
            sys.stdout.write(decoder.add([token]))
            sys.stdout.flush()
            logits = session.push(token)
    except KeyboardInterrupt:
        sys.stderr.write(" [stopped]")
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    return reply, time.perf_counter() - start


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template", epilog=EXAMPLES)
    add_generation_arguments(c)
    c.add_argument("--system", help="system prompt")
    add_chat_template_argument(c)
    add_compile_argument(c)
    c.set_defaults(func=cmd_chat)
