"""Hostile or careless text input: chat templates bounded in size and time, tokenizers that never panic and
refuse invalid Unicode the same way on every backend (issue 15).

Bombs run in a child process with a timeout and an address-space limit, so a regression fails the test
instead of exhausting the machine. Tests needing a file from the assets folder skip when it is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from llama_core.tokenizer import Tokenizer
from llama_core.tokenizer.backends import MAX_WHITESPACE_RUN, cut_long_whitespace
from llama_core.tokenizer.chat_template import render_template
from tests.conftest import REPO, assets_dir

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2?"}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None}


def run_bounded(code: str, timeout: float = 30, memory_gb: int = 2) -> dict:
    """Run `code` in a child with an address-space limit; it prints one JSON line, returned here."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({memory_gb << 30}, {memory_gb << 30}))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- chat templates: bounded size and time ---------------------------------------------------------------------

BOMBS = {
    "str_times": "{{ 'a' * 10**10 }}",
    "list_times": "{{ ([1] * 10**9)|length }}",
    "int_power": "{{ 7 ** 10000000 }}",
    "int_squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "plus_doubling": "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    "tilde_doubling": "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "center": "{{ 'x'|center(10**10) }}",
    "ljust": "{{ 'x'.ljust(10**10) }}",
    "str_format_width": "{{ '{:>9999999999}'.format(1) }}",
    "percent_width": "{{ '%09999999999d' % 1 }}",
    "format_filter_star": "{{ '%*d'|format(10**10, 1) }}",
    "replace": "{{ ('a' * 1000).replace('a', 'a' * 100000) }}",
    "tojson_indent": "{{ messages|tojson(indent=10**9) }}",
    "output": "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxx' }}{% endfor %}{% endfor %}",
}


def test_chat_template_size_bombs_fail_fast_and_clearly():
    # Every bomb in one child (one interpreter start): each must raise the limit error, none may allocate
    # past 2 GB (MemoryError) or take long. Without the bounds the first one alone needs 10 GB.
    result = run_bounded(f"""
        import json, time
        from llama_core.tokenizer.chat_template import render_template
        out = {{}}
        for name, template in {BOMBS!r}.items():
            start = time.monotonic()
            try:
                render_template(template, [{{"role": "user", "content": "hi"}}], True, {{"bos_token": "<s>"}})
                out[name] = "rendered"
            except ValueError as e:
                out[name] = type(e).__name__ + ": " + str(e)
            except BaseException as e:
                out[name] = "raw " + type(e).__name__ + ": " + str(e)[:200]
            out[name] += " in %.2f s" % (time.monotonic() - start)
        print(json.dumps(out))
    """, timeout=60)
    for name, outcome in result.items():
        assert outcome.startswith("TemplateLimitError: chat template exceeded the"), (name, outcome)
        assert float(outcome.rsplit(" in ", 1)[1][:-2]) < 3, (name, outcome)


LOOPS = {
    "nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_list": "{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
    "captured": "{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                "{% endset %}",
    "macro_fanout": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
}


def test_chat_template_endless_loops_hit_the_time_limit():
    # 10^10 iterations with empty bodies (nothing rendered, nothing called) and exponential recursion: the
    # render deadline (lowered to 0.3 s here; 5 s by default) stops each.
    result = run_bounded(f"""
        import json, time
        from llama_core.tokenizer import template_sandbox
        from llama_core.tokenizer.chat_template import render_template
        template_sandbox.TIME_LIMIT_S = 0.3
        out = {{}}
        for name, template in {LOOPS!r}.items():
            start = time.monotonic()
            try:
                render_template(template, [{{"role": "user", "content": "hi"}}], True, {{}})
                out[name] = "rendered"
            except ValueError as e:
                out[name] = str(e)
            out[name] += " in %.2f s" % (time.monotonic() - start)
        print(json.dumps(out))
    """, timeout=60)
    for name, outcome in result.items():
        assert outcome.startswith("chat template exceeded the render time limit of 0.3 s"), (name, outcome)
        assert float(outcome.rsplit(" in ", 1)[1][:-2]) < 2, (name, outcome)


def test_chat_template_endless_recursion_is_a_value_error():
    with pytest.raises(ValueError, match="recursion limit"):
        render_template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", MESSAGES, True, SPECIAL)


def test_chat_template_bounds_leave_ordinary_constructs_alone():
    # Sizes and operators real templates use: concatenation, `~`, repetition, formatting, loops, namespaces.
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ '<|' ~ m['role'] ~ '|>' + m['content'] * 2 + '%03d' % loop.index }}{% endfor %}"
                "{{ '=' * 3 }}{{ '{:>4}'.format(ns.n) }}{{ 2 ** 10 }}{{ 'x'|center(5) }}{{ messages[:1]|tojson(indent=2) }}")
    text = render_template(template, MESSAGES, True, SPECIAL)
    assert text.startswith("<|system|>Be brief.Be brief.001<|user|>Hi thereHi there002")
    assert '===   41024  x  [\n  {\n    "role": "system"' in text
    long = [{"role": "user", "content": "word " * 200_000}]  # a 1M-character message still renders
    assert len(render_template("{{ messages[0]['content'] ~ '!' }}", long, True, SPECIAL)) == 1_000_001


# The Llama 2 and TinyLlama (Zephyr) templates as published on the hub, beside the asset files' own.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def _real_templates() -> dict[str, str]:
    templates = {"llama2": LLAMA2_TEMPLATE, "tinyllama": TINYLLAMA_TEMPLATE}
    if (assets_dir() / "llama3-hf").is_dir():
        templates["llama3"] = Tokenizer.from_pretrained(assets_dir() / "llama3-hf").chat_template
    smol = assets_dir() / SMOLLM2
    if smol.is_file():
        templates["smollm2"] = Tokenizer.from_pretrained(smol).chat_template
    return templates


def test_real_chat_templates_render_as_in_transformers(transformers_module):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    templates = _real_templates()
    for name, template in templates.items():
        for gen in (True, False):
            ours = render_template(template, MESSAGES, gen, SPECIAL)
            theirs = _compile_jinja_template(template).render(messages=MESSAGES, add_generation_prompt=gen,
                                                              tools=None, documents=None, **SPECIAL)
            assert ours == theirs, (name, gen)
    if len(templates) < 4:
        pytest.skip(f"only {sorted(templates)} checked: assets absent from {assets_dir()}")


# ---- tokenizers: no panics, one error for invalid Unicode --------------------------------------------------------

BACKENDS = {
    "sentencepiece": "llama2-tokenizer",
    "tiktoken": "llama3-tiktoken",
    "hf": "llama3-hf",
    "gguf": "llamacpp-vocab/ggml-vocab-llama-spm.gguf",  # GGUFBackend; the BPE one shares HFBackend's path
}
SMOLLM2 = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer(name: str) -> Tokenizer:
    path = assets_dir() / BACKENDS[name]
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_lone_surrogates_are_one_clear_error_on_every_backend(name):
    tok = _tokenizer(name)
    for call in (lambda: tok.encode("ab\ud800cd"), lambda: tok(["fine", "x\udfffy"]),
                 lambda: tok.apply_chat_template([{"role": "user", "content": "hi \ud800"}])):
        with pytest.raises(ValueError, match=r"not valid Unicode: lone surrogate '\\ud[8f]..' at position \d"):
            call()
    with pytest.raises(ValueError, match=r"text 1 of the batch .* at position 1"):
        tok(["fine", "x\udfffy"])


def test_long_whitespace_runs_never_panic():
    # 10 MB of spaces (and of newlines) once panicked inside tokenizers' regex (pyo3 PanicException, which
    # `except Exception` cannot catch). Child process: a panic or a hang fails the test, not the session.
    path = assets_dir() / "llama3-hf"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    result = run_bounded(f"""
        import json, time
        from llama_core.tokenizer import Tokenizer
        tok = Tokenizer.from_pretrained({str(path)!r})
        out = {{}}
        for name, text in (("spaces", " " * 10_000_000), ("newlines", "a" + "\\n" * 10_000_000 + "b")):
            start = time.monotonic()
            try:
                out[name] = [len(tok.encode(text, add_bos=False)), time.monotonic() - start]
            except BaseException as e:
                out[name] = ["raw " + type(e).__name__, 0]
        print(json.dumps(out))
    """, timeout=90, memory_gb=8)
    # Llama 3 encodes 128 spaces and 32 newlines per token.
    assert result["spaces"][0] == 10_000_000 // 128 and result["newlines"][0] == 2 + 10_000_000 // 32, result
    assert max(r[1] for r in result.values()) < 30, result


def test_cut_whitespace_gives_the_library_ids():
    # The cut applies only past MAX_WHITESPACE_RUN characters; checked with a small run length against the
    # library's own ids on the uncut text, on both byte-level BPE vocabularies at hand.
    assert cut_long_whitespace("a b" * 1000) == ["a b" * 1000]
    assert cut_long_whitespace("x" + " " * (2 * MAX_WHITESPACE_RUN + 5)) == [
        "x" + " " * MAX_WHITESPACE_RUN, " " * (MAX_WHITESPACE_RUN + 5)]
    checked = 0
    for name in ("hf", "smollm2"):
        path = assets_dir() / (SMOLLM2 if name == "smollm2" else BACKENDS[name])
        if not path.exists():
            continue
        tk = Tokenizer.from_pretrained(path).backend.tk
        for run in (" ", "\n", "\t", "\u3000"):
            for n in (2049, 3000, 4097, 5000):
                text = "Hello" + run * n + "world, again" + run * (n + 7)
                whole = tk.encode(text, add_special_tokens=False).ids
                pieces = cut_long_whitespace(text, max_run=1024)
                assert len(pieces) > 1
                cut = [i for p in pieces for i in tk.encode(p, add_special_tokens=False).ids]
                assert cut == whole, (name, repr(run), n)
                checked += 1
    if not checked:
        pytest.skip(f"no byte-level BPE tokenizer in {assets_dir()}")


def test_whitespace_runs_the_library_handles_keep_its_ids():
    # A 200k-space run goes through the cut at the real MAX_WHITESPACE_RUN; ordinary text is untouched.
    tok = _tokenizer("hf")
    raw = tok.backend.tk
    for text in ("Hello world.\n\n  Indented\tcode", "x" + " " * 200_000 + "y" + "\n" * 150_000 + "z"):
        assert tok.encode(text, add_bos=False) == raw.encode(text, add_special_tokens=False).ids

