"""A Jinja sandbox for chat templates that is bounded in time and memory, not only in what it can reach.

jinja2's ImmutableSandboxedEnvironment stops escapes (no dunder attributes, no mutation of lists and dicts) but
not resource bombs: `{{ 'a' * 10**10 }}` allocates 10 GB and two nested loops over `range(100000)` run for
hours. Chat templates come from hub repositories, so rendering one must fail fast and clearly instead. The
bounds, per render:

- every value an operator, filter, string method or block capture builds is at most `MAX_CHARS` characters
  (or list items), and every integer at most `MAX_INT_BITS` bits; the check comes *before* the allocation
  wherever the size is known in advance (`*`, `**`, `+`, widths in format specs and padding methods);
- the rendered text is at most `MAX_CHARS` characters (the template is rendered as a stream and counted);
- rendering stops after `TIME_LIMIT_S` seconds, checked at every loop iteration (each `for` iterable is
  wrapped when the template is compiled), call, attribute lookup and operator.

Real chat templates (Llama 2/3, SmolLM2, Mistral, ...) are far below every bound, so they render exactly as in
transformers' environment. Violations raise `TemplateLimitError`, a ValueError.
"""

from __future__ import annotations

import contextvars
import math
import re
import string
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_CHARS = 1 << 24  # 16M characters: a 100k-token conversation is ~0.5M
MAX_INT_BITS = 1 << 16
TIME_LIMIT_S = 5.0
_CHECK_EVERY = 1024  # loop iterations between clock reads (a read costs about as much as an iteration)

# Widths and precisions in printf-style ("%-10.3f", "%*d") and str.format ("{:>10}") specs.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")
# str methods whose integer arguments are output widths.
_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


class TemplateLimitError(ValueError):
    """A chat template exceeded a render bound (size, integer size or time)."""


class _Budget:
    def __init__(self) -> None:
        self.deadline = time.monotonic() + TIME_LIMIT_S

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template exceeded the render time limit of {TIME_LIMIT_S:g} s "
                                     "(a loop or recursion that does not end in time)")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _check_time() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.check_time()


def _too_big(what: str, size: int, unit: str = "characters", limit: int = MAX_CHARS) -> TemplateLimitError:
    return TemplateLimitError(f"chat template exceeded the size limit: {what} would have {size} {unit} "
                              f"(at most {limit})")


def _check_size(what: str, size: int) -> None:
    if size > MAX_CHARS:
        raise _too_big(what, size)


def _check_int(what: str, bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _too_big(what, bits, "bits", MAX_INT_BITS)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sized(x: Any) -> bool:
    return isinstance(x, (str, list, tuple))


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse `op` before computing it when its result would be too large."""
    if op == "*":
        if (_sized(left) and _is_int(right)) or (_is_int(left) and _sized(right)):
            seq, n = (left, right) if _sized(left) else (right, left)
            _check_size(f"{type(seq).__name__} * {n}", len(seq) * max(n, 0))
        elif _is_int(left) and _is_int(right):
            _check_int("an integer product", left.bit_length() + right.bit_length())
    elif op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        _check_int(f"{left} ** {right}", math.ceil(right * math.log2(abs(left))))
    elif op == "+" and _sized(left) and _sized(right):
        _check_size(f"{type(left).__name__} + {type(right).__name__}", len(left) + len(right))
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left, right)


def _check_widths(what: str, widths: Iterable[Any]) -> None:
    for w in widths:
        if _is_int(w) and w > MAX_CHARS:
            raise _too_big(what, w)


def _check_percent_format(fmt: str, args: Any) -> None:
    """`fmt % args`: literal widths, and `*` widths taken from the arguments."""
    literal = [int(n) for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n and n != "*"]
    _check_widths("a %-format width", literal)
    values = args if isinstance(args, tuple) else (args,)
    if any(m.group(1) == "*" or m.group(2) == "*" for m in _PERCENT_SPEC.finditer(fmt)):
        _check_widths("a %-format width", values)


def _check_str_format(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`fmt.format(...)`: widths in the specs, literal or nested (`{:{w}}`, taken from the arguments)."""
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:
        return  # str.format itself reports the malformed format string
    _check_widths("a format-spec width", [int(n) for spec in specs for n in _NUMBER.findall(spec)])
    if any("{" in spec for spec in specs):
        _check_widths("a format-spec width", [*args, *kwargs.values()])


def _check_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """String methods that take an output width or multiply their input."""
    func = getattr(func, "__wrapped__", func)  # the sandbox wraps str.format / format_map
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in _PADDING_METHODS:
        _check_widths(f"str.{name}", [*args, *kwargs.values()])
    elif name == "format":
        _check_str_format(owner, args, kwargs)
    elif name == "format_map" and args:
        _check_str_format(owner, (), dict(args[0]) if isinstance(args[0], dict) else {})
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = owner.count(args[0]) if args[0] else len(owner) + 1
        _check_size("str.replace", len(owner) + count * max(len(args[1]) - len(args[0]), 0))


def _guarded_iter(iterable: Any) -> Iterator[Any]:
    """Every `for` loop of a template iterates through this: the clock is read every few iterations, so
    nested loops over large ranges stop at the deadline even when their bodies call nothing."""
    budget = _budget.get()
    for k, item in enumerate(iterable):
        if budget is not None and k % _CHECK_EVERY == _CHECK_EVERY - 1:
            budget.check_time()
        yield item


def _bounded_concat(parts: Iterable[Any]) -> str:
    """Joins the output of `{% set x %}...{% endset %}` blocks, macros and the `~` operator (which, as
    jinja's own, converts each operand with str)."""
    parts = [p if isinstance(p, str) else str(p) for p in parts]
    _check_size("a captured block or `~` concatenation", sum(len(p) for p in parts))
    return "".join(parts)


class _GuardLoops(NodeTransformer):
    """Routes every `for` iterable through `_guarded_iter` and `~` through `_bounded_concat`. The hooks are
    environment attributes, which a template cannot shadow with `{% set %}`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("guarded_iter"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), [nodes.List(node.nodes, lineno=node.lineno)],
                          [], None, None, lineno=node.lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment plus the size and time bounds of this module (see its docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.guarded_iter = _guarded_iter
        self.bounded_concat = _bounded_concat
        self.concat = _bounded_concat  # what compiled templates join block and macro buffers with
        self.globals.pop("lipsum", None)  # lipsum(n=10**9) allocates in one call; no chat template uses it
        for name in ("center", "indent", "format"):
            self.filters[name] = _bounded_filter(name, self.filters[name])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        _check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def compile_bounded(self, source: str) -> jinja2.Template:
        tree = _GuardLoops().visit(self.parse(source))
        return self.from_string(tree)


def _bounded_filter(name: str, filter_func: Any) -> Any:
    """center(width), indent(width) and format(*args) allocate what their arguments say."""

    def bounded(value: Any, *args: Any, **kwargs: Any) -> Any:
        params = [*args, *kwargs.values()]
        if name == "format" and isinstance(value, str):
            _check_percent_format(value, tuple(args) or kwargs)
        elif name == "indent":  # adds the indent (a width or a string) to every line
            width = kwargs.get("width", args[0] if args else 4)
            per_line = len(width) if isinstance(width, str) else width if _is_int(width) else 0
            text = str(value)
            _check_size("the indent filter", len(text) + (text.count("\n") + 1) * max(per_line, 0))
        else:
            _check_widths(f"the {name} filter", params)
        return filter_func(value, *args, **kwargs)

    bounded.__name__ = filter_func.__name__
    if hasattr(filter_func, "jinja_pass_arg"):  # keeps @pass_eval_context and friends working
        bounded.jinja_pass_arg = filter_func.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render as a stream, counting output, inside a fresh time budget."""
    token = _budget.set(_Budget())
    try:
        out: list[str] = []
        size = 0
        for piece in template.generate(**variables):
            size += len(piece)
            _check_size("the rendered chat prompt", size)
            out.append(piece)
        return "".join(out)
    except RecursionError as e:
        raise TemplateLimitError("chat template exceeded the recursion limit (a macro that calls itself "
                                 "without end)") from e
    finally:
        _budget.reset(token)


__all__ = ["MAX_CHARS", "MAX_INT_BITS", "TIME_LIMIT_S", "BoundedSandbox", "TemplateLimitError", "check_indent", "render"]


_MAX_JSON_INDENT = 1024


def check_indent(value: Any, indent: Any) -> None:
    """tojson's indent is repeated once per nesting level on every line: refuse absurd ones up front."""
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    if width > _MAX_JSON_INDENT:
        raise _too_big("the tojson indent", width, limit=_MAX_JSON_INDENT)
