"""Chat prompts: a model's own Jinja template, or the built-in Llama 3 and Llama 2 formats.

Built-in formats are a list of segments, special-token ids and plain text, so the same construction gives
both the ids (text encoded as ordinary text: a user typing "<|eot_id|>" cannot end a turn) and the prompt
string. Jinja templates produce a string, which is then encoded with special tokens recognised, as
`transformers` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from . import template_sandbox

Message = Mapping[str, Any]
# A prompt segment: a special token id, or text to encode as ordinary text (no BOS/EOS, nothing special).
Segment = int | str

# The special tokens that make Meta's Llama 3 chat format unambiguous for a tokenizer without a template.
LLAMA3_HEADER_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# ChatML (OpenAI's, used by Qwen, SmolLM and many fine-tunes), as the Jinja text such models ship.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_B_INST, _E_INST = "[INST]", "[/INST]"
_B_SYS, _E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {k} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"message {k} has no 'role' string: {m!r}")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"message {k} ({m['role']}): 'content' must be a string for the built-in formats, "
                            f"got {type(m.get('content')).__name__}")


def llama3_segments(messages: Sequence[Message], add_generation_prompt: bool, special: Mapping[str, int]) -> list[Segment]:
    """Meta's Llama 3 ChatFormat: <|begin_of_text|>, then per message a role header and the stripped content
    closed by <|eot_id|>; the generation prompt is an open assistant header. Role, "\\n\\n" and content are
    encoded separately, as Meta does."""
    check_messages(messages)
    start, end, eot = special["<|start_header_id|>"], special["<|end_header_id|>"], special["<|eot_id|>"]
    segments: list[Segment] = [special["<|begin_of_text|>"]]
    for m in messages:
        segments += [start, m["role"], end, "\n\n", m["content"].strip(), eot]
    if add_generation_prompt:
        segments += [start, "assistant", end, "\n\n"]
    return segments


def llama2_segments(messages: Sequence[Message], bos: int, eos: int) -> list[Segment]:
    """Meta's Llama 2 `chat_completion`: a system prompt is folded into the first user message; each finished
    (user, assistant) pair is `<s>[INST] user [/INST] answer </s>`; a final user message is `<s>[INST] user
    [/INST]`, which is already the generation prompt."""
    check_messages(messages)
    dialog = [dict(m) for m in messages]
    if dialog and dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise ValueError("a Llama 2 system prompt must be followed by a user message")
        merged = {"role": dialog[1]["role"], "content": _B_SYS + dialog[0]["content"] + _E_SYS + dialog[1]["content"]}
        dialog = [merged, *dialog[2:]]
    expected = ["user", "assistant"]
    for k, m in enumerate(dialog):
        if m["role"] != expected[k % 2]:
            raise ValueError("the Llama 2 chat format takes an optional 'system' message, then 'user' and "
                             f"'assistant' alternating from 'user'; got roles {[m['role'] for m in messages]}")
    segments: list[Segment] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):  # a trailing user message: below
        segments += [bos, f"{_B_INST} {prompt['content'].strip()} {_E_INST} {answer['content'].strip()} ", eos]
    if len(dialog) % 2:
        segments += [bos, f"{_B_INST} {dialog[-1]['content'].strip()} {_E_INST}"]
    return segments


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    # Chat templates come from hub repos: untrusted code, so a sandbox bounded in time and memory
    # (template_sandbox), and the same settings as transformers (trim_blocks, lstrip_blocks, loop controls, its
    # tojson, raise_exception, strftime_now) so a template renders here exactly as it does there.
    import jinja2
    import jinja2.ext

    from .template_sandbox import BoundedSandbox, check_indent

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        check_indent(x, indent)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.compile_bounded(template)


def render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                    special_tokens: Mapping[str, str | None], **kwargs: Any) -> str:
    """Render a Hugging Face chat template. `special_tokens` (bos_token, eos_token, ...) and `tools=None`,
    `documents=None` are provided as transformers does; `kwargs` go to the template (e.g. `date_string`)."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    variables = {"tools": None, "documents": None, **special_tokens, **kwargs}
    return template_sandbox.render(_compile(template), {"messages": [dict(m) for m in messages],
                                                        "add_generation_prompt": add_generation_prompt, **variables})


def pick_template(chat_template: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (use "default")."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        return named.get("default")
    raise ValueError(f"chat_template must be a string or a list of {{name, template}}, got {type(chat_template).__name__}")
