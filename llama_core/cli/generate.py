"""``llama-core generate``: a prompt in, the completion streamed to stdout, prompt and decode speed to stderr."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..modeling.cache import StaticCache
from .chat_format import add_chat_template_argument, choose_chat_format
from .generation_options import (
    add_compile_argument,
    add_generation_arguments,
    check_sampling,
    load_model_and_tokenizer,
    should_compile,
)

EXAMPLES = """examples:
  llama-core generate --model stories/ --prompt "Once upon a time" --max-new-tokens 40
  llama-core generate --model SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "What is the capital of France?"
  llama-core generate --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --prompt "Hi" --temperature 0.7 --seed 1
"""


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..generation import generate

    check_sampling(args)
    model, tok = load_model_and_tokenizer(args)
    if args.chat:
        choose_chat_format(tok, args.chat_template, args.model)
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        # BOS as the tokenizer file says (transformers does the same); an empty prompt starts from BOS
        ids = tok.encode(args.prompt) or ([tok.bos_id] if tok.bos_id is not None else [])
        if not ids:
            raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from")
    positions = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > positions:  # as chat: past its positions a model's output degrades
        raise ValueError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} does not fit "
                         f"the model's {positions} positions")
    prompt = torch.tensor([ids], device=model.device)
    # A completion continues the prompt's text: decoded after the prompt's tokens, its first word keeps its
    # leading space (sentencepiece drops it from a text's first token). A chat reply is a text of its own.
    decoder = tok.incremental_decoder(skip_special_tokens=True)
    if not args.chat:
        decoder.add(ids)  # the prompt as context; its text is not printed again
    if args.echo:
        sys.stdout.write(tok.decode(ids, skip_special_tokens=True) if not args.chat else args.prompt + "\n")
    stops = set(tok.stop_ids) | set(model.config.eos_token_ids)
    times: list[float] = []

    def on_step(new_ids: list[int]) -> None:  # one id per step (a single row)
        times.append(time.perf_counter())
        if new_ids[0] not in stops:
            sys.stdout.write(decoder.add(new_ids))
            sys.stdout.flush()

    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   eos_token_id=sorted(stops))
    compile_s = None
    if should_compile(args):
        options["cache"], compile_s = _compiled_cache(model, prompt, args.max_new_tokens)
        options["compile"] = True
    start = time.perf_counter()
    interrupted = False
    try:
        generate(model, prompt, streamer=on_step, **options)
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated, say how fast it went, exit 130
        interrupted = True
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    if interrupted:
        sys.stderr.write("interrupted\n")
    _report(len(ids), start, times, compile_s)
    return 130 if interrupted else 0


def _compiled_cache(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> tuple[StaticCache, float]:
    """A static cache for this call (bucketed), and the seconds spent compiling the decode step for it: a
    two-token warm-up run, so the compile is reported apart from the decode speed."""
    from ..generation import generate
    from ..generation.session import bucketed_length
    from ..modeling.cache import StaticCache

    length = bucketed_length(prompt.shape[1] + max_new_tokens, model.config.max_position_embeddings)
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=length, dtype=model.dtype, device=model.device)
    sys.stderr.write("compiling the decode step (the first time for a model and cache size: about half a minute "
                     "on a 2-core CPU; then from inductor's cache; --no-compile skips it)\n")
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=2, eos_token_id=[], cache=cache, compile=True)
    return cache, time.perf_counter() - start


def _report(prompt_tokens: int, start: float, times: list[float], compile_s: float | None = None) -> None:
    """Prompt speed from the time to the first token (prefill + one sampling); decode from the rest; the
    compile time, when there was one, on its own."""
    if not times:
        return
    first = times[0] - start
    line = f"prompt: {prompt_tokens} tokens, first token after {first:.3f} s ({prompt_tokens / first:,.1f} tokens/s)"
    if len(times) > 1:
        decode = times[-1] - times[0]
        line += f"; decode: {len(times) - 1} tokens in {decode:.3f} s ({(len(times) - 1) / decode:,.1f} tokens/s)"
    if compile_s is not None:
        line += f"; compile: {compile_s:.1f} s before the prompt"
    sys.stderr.write(line + "\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="stream a completion of a prompt", epilog=EXAMPLES)
    add_generation_arguments(g)
    g.add_argument("--prompt", required=True, help="the text to continue ('' starts from BOS)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    add_chat_template_argument(g)
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    add_compile_argument(g)
    g.set_defaults(func=cmd_generate)
