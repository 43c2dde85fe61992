"""``llama-core generate`` and ``llama-core chat``: text in, streamed text out, with speed on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .cache import DynamicCache
from .generation import generate
from .model import LlamaForCausalLM
from .sampling import LogitsSettings, process_logits, sample
from .tokenizer import Tokenizer


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, Meta directory or llama2.c .bin")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quantize", choices=["int8", "int8-weight-only"],
                   help="quantise the linear layers while loading (see llama_core.quant)")


def _load(args: argparse.Namespace) -> tuple[LlamaForCausalLM, Tokenizer]:
    tokenizer_source = args.tokenizer or args.model
    if args.tokenizer is None and Path(args.model).is_file():
        raise ValueError(f"{args.model} is a single weights file; pass --tokenizer (e.g. a sentencepiece .model)")
    tokenizer = Tokenizer.from_pretrained(tokenizer_source)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    return model, tokenizer


def _check_sampling(args: argparse.Namespace) -> None:
    # Checked before the (possibly long) model load, so a typo costs nothing.
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.max_new_tokens < 0:
        raise ValueError("--top-k and --max-new-tokens must be >= 0")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_sampling(args)
    model, tok = _load(args)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    prompt = torch.tensor([ids], device=model.device)
    decoder = tok.incremental_decoder(skip_special_tokens=True)
    stops = set(tok.stop_ids) | set(model.config.eos_token_ids)
    times: list[float] = []

    def on_step(new_ids: list[int]) -> None:  # one id per step (a single row)
        times.append(time.perf_counter())
        if new_ids[0] not in stops:
            sys.stdout.write(decoder.add(new_ids))
            sys.stdout.flush()

    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
             temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
             eos_token_id=sorted(stops), streamer=on_step)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    _report(len(ids), start, times)
    return 0


def _report(prompt_tokens: int, start: float, times: list[float]) -> None:
    """Prompt speed from the time to the first token (prefill + one sampling); decode from the rest."""
    if not times:
        return
    first = times[0] - start
    line = f"prompt: {prompt_tokens} tokens, first token after {first:.3f} s ({prompt_tokens / first:,.1f} tokens/s)"
    if len(times) > 1:
        decode = times[-1] - times[0]
        line += f"; decode: {len(times) - 1} tokens in {decode:.3f} s ({(len(times) - 1) / decode:,.1f} tokens/s)"
    sys.stderr.write(line + "\n")


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn loop. The KV cache is kept across turns: each turn re-renders the chat template, keeps
    the cache for the longest prefix it shares with what was fed so far, and feeds only the rest (templates
    such as Llama 2's re-tokenise earlier turns, so the shared prefix can end before the last reply)."""
    _check_sampling(args)
    model, tok = _load(args)
    settings = LogitsSettings(do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                              top_p=args.top_p, top_k=args.top_k)
    generator = torch.Generator(model.device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    stops = set(tok.stop_ids) | set(model.config.eos_token_ids)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cache, cached = DynamicCache(), []
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
        keep = _common_prefix(cached, ids, limit=len(ids) - 1)  # feed at least one token
        cache.crop(keep)
        new = ids[keep:]
        with torch.inference_mode():
            logits = model(torch.tensor([new], device=model.device), past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits[:, -1]
            cached = list(ids)
            reply: list[int] = []
            decoder = tok.incremental_decoder(skip_special_tokens=True)
            for _ in range(args.max_new_tokens):
                scores = process_logits(logits.float(), settings)
                token = int(sample(scores.softmax(-1), generator) if settings.do_sample else scores.argmax(-1))
                logits = model(torch.tensor([[token]], device=model.device), past_key_values=cache,
                               use_cache=True).logits[:, -1]
                cached.append(token)  # fed, so the next turn's template can reuse it
                if token in stops:
                    break
                reply.append(token)
                sys.stdout.write(decoder.add([token]))
                sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return 0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="stream a completion of a prompt")
    add_generation_arguments(g)
    g.add_argument("--prompt", required=True, help="the text to continue ('' starts from BOS)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    add_generation_arguments(c)
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=cmd_chat)
