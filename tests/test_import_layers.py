"""The import structure: no circles, lower layers never import higher ones, every module imports alone.

The graph is read from the source (``ast``), so it sees imports inside functions (lazy) and under
``if TYPE_CHECKING`` (a design dependency even though it never runs) as well as module-level ones. An import
``from a.b import c`` points at the module ``a.b.c`` when that is a module, else at ``a.b``. The implicit
import of a parent package (importing ``a.b.c`` runs ``a/__init__.py``) is not an edge: every package
``__init__`` would otherwise sit in a circle with its own modules. A PEP 562 lazy table,
``_LAZY_IMPORTS = {".sub": ("Name", ...)}`` at module level, counts as the ``from .sub import Name`` it stands
for, made at import time: the names are the module's public face, so the layer rules hold for them as for an
eager import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "llama_core", "checkpoints_convert")

# The layers, lowest first. A module may import modules of its own layer and of layers listed before it;
# the longest matching prefix decides a module's layer.
LAYERS = (
    "kernels",  # Triton ops and their PyTorch references
    "llama_core._lazy",  # lazy package attributes (imports nothing of ours)
    "llama_core._version",
    "llama_core.quant",  # int8 linear layers (on kernels)
    "llama_core.modeling",  # the network
    "llama_core.model_io",  # reading and writing model checkpoints
    "llama_core.tokenizer",
    "checkpoints_convert",  # Meta / llama2.c / HF formats, built on model_io's readers and writers (and on
    # the tokenizer, so that conversions can carry a model's vocabulary between formats)
    "llama_core.lora",  # LoRA adapters on the model's linears and PEFT's adapter files (on quant and model_io)
    "llama_core.generation",
    "llama_core.train",
    "llama_core.bench",
    "llama_core.cli",
    "llama_core",  # the package root: the public face, re-exporting from the layers above
)

# Upward imports made on purpose, each lazily (inside the function that needs it) and commented as a
# "lazy import" where it is made: (importer, imported) -> why.
DOCUMENTED_LAZY_IMPORTS = {
    ("llama_core.modeling.pretrained", "llama_core.model_io.loading"):
        "from_pretrained is the model's HF face; reading checkpoints builds on the model",
    ("llama_core.modeling.pretrained", "llama_core.model_io.saving"):
        "save_pretrained, as from_pretrained",
    ("llama_core.modeling.model", "llama_core.generation"):
        "LlamaForCausalLM.generate; the decode loop drives a model",
    ("llama_core.model_io.loading", "checkpoints_convert.llama2c"):
        "from_pretrained reads llama2.c files through the converter's reader",
    ("llama_core.model_io.loading", "checkpoints_convert.meta"):
        "from_pretrained reads Meta checkpoints through the converter's reader",
    ("llama_core.model_io.loading", "checkpoints_convert.gguf"):
        "from_pretrained reads GGUF files through the converter's reader",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lazy: bool  # inside a function body: runs when called, not at import
    line: int


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the three packages (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> str | None:
    """``name`` if it is one of our modules, else its nearest ancestor that is, else None (third party)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def _lazy_table(node: ast.stmt) -> list[ast.ImportFrom]:
    """A module-level ``_LAZY_IMPORTS = {".sub": ("Name", ...)}`` as the ``from .sub import Name, ...`` each
    entry stands for (line numbers kept); [] for any other statement. Only literals count: a table this
    cannot read fails here rather than hiding its imports."""
    if not (isinstance(node, (ast.Assign, ast.AnnAssign))
            and any(isinstance(t, ast.Name) and t.id == "_LAZY_IMPORTS"
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
        return []
    assert isinstance(node.value, ast.Dict), f"line {node.lineno}: _LAZY_IMPORTS must be a dict literal"
    imports = []
    for key, value in zip(node.value.keys, node.value.values, strict=True):
        target = ast.literal_eval(key)
        names = ast.literal_eval(value)
        assert isinstance(target, str) and all(isinstance(n, str) for n in names), f"line {key.lineno}: {target!r}"
        level = len(target) - len(target.lstrip("."))
        imports.append(ast.ImportFrom(module=target[level:] or None, names=[ast.alias(n) for n in names],
                                      level=level, lineno=key.lineno))
    return imports


@cache
def edges() -> tuple[Edge, ...]:
    out = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node: ast.AST, in_function: bool, module: str = module, path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                targets = []
                if isinstance(child, ast.Import):
                    targets = [(alias.name, child.lineno) for alias in child.names]
                for node in ([child] if isinstance(child, ast.ImportFrom) else _lazy_table(child)):
                    base = _resolve(module, path, node)
                    # "from pkg import sub" imports the module pkg.sub when there is one.
                    targets += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base, node.lineno)
                                for a in node.names]
                for target, line in targets:
                    ours = _ours(target)
                    if ours is not None and ours != module:
                        out.append(Edge(module, ours, lazy, line))
                visit(child, lazy)

        visit(tree, False)
    return tuple(out)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _graph(selected: list[Edge], key=lambda m: m) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in selected:
        if key(e.source) != key(e.target):
            graph.setdefault(key(e.source), set()).add(key(e.target))
    return graph


def test_the_graph_is_read():
    """The parser sees what is there: a known eager import, a known lazy one, a TYPE_CHECKING one."""
    found = {(e.source, e.target, e.lazy) for e in edges()}
    assert ("llama_core.modeling.model", "llama_core.modeling.layers", False) in found
    assert ("llama_core.modeling.model", "llama_core.generation", True) in found
    assert ("llama_core.generation.decode_loop", "llama_core.generation.plan", False) in found  # TYPE_CHECKING
    assert ("llama_core.cli.bench", "llama_core.bench", True) in found  # "from .. import bench"
    # A lazy table's entries, at the table's own lines (TYPE_CHECKING imports the same names further down).
    table = next(n for n in ast.parse(modules()["llama_core.train"].read_text(encoding="utf-8")).body if _lazy_table(n))
    table_lines = range(table.lineno, table.end_lineno + 1)
    assert any(e.source == "llama_core.train" and e.target == "llama_core.train.loop" and not e.lazy
               and e.line in table_lines for e in edges())
    assert len(modules()) > 60


def test_no_import_circles_between_modules():
    """Every import counts, lazy ones included: a circle through a function-level import still means two
    modules that cannot be understood (or moved) apart."""
    assert _cycles(_graph(list(edges()))) == []


def test_no_import_circles_between_packages_at_import_time():
    """At the package level (each sub-package of llama_core, kernels, checkpoints_convert) the imports that
    run at import time form no circle; only the documented lazy imports point back up."""
    eager = [e for e in edges() if not e.lazy]
    assert _cycles(_graph(eager, key=lambda m: LAYERS[layer(m)])) == []


def test_lower_layers_never_import_higher_ones():
    upward = [e for e in edges() if layer(e.target) > layer(e.source)]
    undocumented = [f"{e.source} (line {e.line}) imports {e.target}" for e in upward
                    if (e.source, e.target) not in DOCUMENTED_LAZY_IMPORTS]
    assert undocumented == [], "import upward only through a documented lazy import:\n" + "\n".join(undocumented)
    eager = [f"{e.source} (line {e.line}) imports {e.target}" for e in upward if not e.lazy]
    assert eager == [], "the documented upward imports must stay inside functions:\n" + "\n".join(eager)


def test_documented_lazy_imports_exist_and_say_so_where_they_are_made():
    """No stale entries in the list above, and each import carries a comment naming it a lazy import."""
    for (source, target), why in DOCUMENTED_LAZY_IMPORTS.items():
        sites = [e for e in edges() if (e.source, e.target) == (source, target)]
        assert sites, f"{source} no longer imports {target}: drop it from DOCUMENTED_LAZY_IMPORTS ({why})"
        lines = modules()[source].read_text(encoding="utf-8").splitlines()
        for e in sites:
            context = " ".join(lines[max(0, e.line - 4): e.line]).lower()
            assert "lazy import" in context, f"{source} line {e.line}: say why {target} is imported lazily"


def test_every_package_says_what_it_holds_and_may_import():
    for name, path in modules().items():
        if path.name == "__init__.py" and name.startswith("llama_core.") and name.count(".") == 1:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "may import" in doc.lower(), f"{path.relative_to(ROOT)}: the docstring must say what it may import"


# A child process imports each module on its own: torch (the slow part) is imported once, then a fork per
# module imports just that module into an interpreter that holds none of ours. A circle that Python cannot
# resolve shows up there as "cannot import name ... (most likely due to a circular import)".
_IMPORT_EACH = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    import torch
    failures = {}
    for name in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
                if name == "llama_core" and "triton" in sys.modules:
                    raise AssertionError("import llama_core imported triton (kernels must import it lazily)")
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failures[name] = status
    print(json.dumps(failures))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked interpreter")
def test_every_module_imports_alone():
    names = [n for n in modules() if not n.endswith("__main__")]  # those run a command when imported
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {}, f"modules that fail to import alone: {sorted(failures)}\n{result.stderr[-4000:]}"
