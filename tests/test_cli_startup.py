"""Startup: ``llama-core --help``, ``llama-core COMMAND --help`` and argument errors answer without importing
torch (1-2 s on an idle machine, tens of seconds on a loaded one), and ``import llama_core`` is lazy.

Each check runs in a fresh interpreter (this process has torch loaded already). Times are bounded generously
(10 s) so a loaded CI box does not make them flaky; the measured numbers are in the README.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

COMMANDS = ("summary", "generate", "chat", "bench", "train", "convert")
# Modules that take a noticeable time to import; none of them belongs in a --help.
HEAVY = ("torch", "numpy", "safetensors", "huggingface_hub", "transformers", "triton", "tokenizers",
         "sentencepiece", "tiktoken", "jinja2", "gguf", "tqdm")
BOUND_S = 10.0
LAZY_PACKAGES = ("llama_core", "llama_core.modeling", "llama_core.train", "checkpoints_convert")


def _python(code_or_args: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *code_or_args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.perf_counter() - start


def _heavy_imported(importtime_log: str) -> list[str]:
    """Top-level heavy packages named in ``python -X importtime``'s log (``... | <indent>name``)."""
    names = {line.rpartition("|")[2].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


_BUILD_PARSERS = """
import argparse, json, sys
from llama_core.cli.main import build_parser
parser = build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
helps = {name: len(p.format_help()) for name, p in sub.choices.items()}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[1]))
print(json.dumps({"torch": "torch" in sys.modules, "heavy": heavy, "commands": sorted(helps)}))
"""


def test_building_every_parser_imports_no_torch():
    """The main parser and every sub-command's parser (help text formatted) in a fresh interpreter: no torch,
    nor any other heavy package."""
    result, _ = _python(["-c", _BUILD_PARSERS, json.dumps(HEAVY)])
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["commands"] == sorted(COMMANDS)
    assert seen["torch"] is False and seen["heavy"] == [], seen


# (argv, what the answer says): help and version exit 0; argument errors exit 2 with argparse's usage error.
ANSWERS = [(["--help"], "usage: llama-core"), *(([c, "--help"], f"usage: llama-core {c}") for c in COMMANDS),
           (["--version"], "llama-core "),
           (["generate", "--bogus"], "the following arguments are required: --model, --prompt"),
           (["generate", "--model", "m", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
           (["train", "--data", "d", "--preset", "no-such-preset", "--output-dir", "o"],
            "argument --preset: invalid choice: 'no-such-preset'")]


@pytest.mark.parametrize(("argv", "answer"), ANSWERS, ids=[" ".join(argv) for argv, _ in ANSWERS])
def test_help_and_argument_errors_answer_without_torch(argv, answer):
    """The real entry point (``python -m llama_core.cli``) in a fresh interpreter: it answers as argparse does,
    imports no torch (nor other heavy package), and within the bound."""
    result, seconds = _python(["-X", "importtime", "-m", "llama_core.cli", *argv])
    error = "--help" not in argv and "--version" not in argv
    assert result.returncode == (2 if error else 0), result.stderr[-3000:]
    if error:
        assert re.search(r"^llama-core( \w+)?: error: ", result.stderr, re.M) and answer in result.stderr
    else:
        assert result.stdout.startswith(answer), result.stdout[:300]
    assert _heavy_imported(result.stderr) == []
    assert seconds < BOUND_S, f"{' '.join(argv)} took {seconds:.1f} s"


def test_convert_entry_point_help_imports_no_torch():
    result, seconds = _python(["-X", "importtime", "-m", "checkpoints_convert", "--help"])
    assert result.returncode == 0 and "meta-to-hf" in result.stdout, result.stderr[-3000:]
    assert _heavy_imported(result.stderr) == []
    assert seconds < BOUND_S


_IMPORT_PACKAGE = """
import json, sys
import llama_core
before = "torch" in sys.modules
model = llama_core.LlamaForCausalLM
print(json.dumps({"torch_before": before, "model": model.__module__, "torch_after": "torch" in sys.modules,
                  "version": llama_core.__version__, "dir": dir(llama_core)}))
"""


def test_import_llama_core_is_lazy_until_a_name_is_used():
    result, _ = _python(["-c", _IMPORT_PACKAGE])
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["torch_before"] is False
    assert seen["model"] == "llama_core.modeling.model" and seen["torch_after"] is True
    import llama_core

    assert seen["version"] == llama_core.__version__
    assert set(llama_core.__all__) <= set(seen["dir"])


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_public_name_resolves_and_unknown_names_say_so(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match=rf"module '{re.escape(package)}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def _type_checking_imports(path) -> dict[str, tuple[str, ...]]:
    """``{".sub": names}`` of the ``from .sub import ...`` statements under ``if TYPE_CHECKING:``."""
    found: dict[str, tuple[str, ...]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    key = "." * stmt.level + (stmt.module or "")
                    found[key] = found.get(key, ()) + tuple(a.name for a in stmt.names)
    return found


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_lazy_table_type_checking_block_and_all_agree(name):
    """The lazy table (what runs), the TYPE_CHECKING imports (what type checkers and IDEs see) and ``__all__``
    (what the package promises) name the same things."""
    module = importlib.import_module(name)
    table = {key: tuple(sorted(names)) for key, names in module._LAZY_IMPORTS.items()}
    declared = {key: tuple(sorted(names)) for key, names in _type_checking_imports(Path(module.__file__)).items()}
    assert table == declared
    if hasattr(module, "__all__"):
        eager = {n for n in module.__all__ if n in vars(module) and n not in module._MODULE_OF}
        assert sorted(n for names in table.values() for n in names) == sorted(set(module.__all__) - eager)


def test_device_default_is_resolved_when_the_command_runs(monkeypatch):
    """--device omitted: None at parse time (no torch), then cuda if available, else cpu, when the model
    loads; what the load used is what the rest of the command sees (args.device)."""
    import argparse

    import torch

    from llama_core import LlamaForCausalLM, Tokenizer
    from llama_core.cli import generation_options
    from llama_core.cli.generate import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["generate", "--model", "org/m", "--tokenizer", "t", "--prompt", "x"])
    assert args.device is None
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    seen = {}
    monkeypatch.setattr(Tokenizer, "from_pretrained", lambda source: None)
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw))
    generation_options.load_model_and_tokenizer(args)
    assert seen["device"] == expected and args.device == expected
    assert generation_options.resolve_device("cpu") == "cpu"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "(default: cuda if available, else cpu)" in " ".join(sub.choices["generate"].format_help().split())


def test_train_parallel_modes_come_from_the_torch_free_config():
    from llama_core.train import config

    with pytest.raises(ValueError, match="parallel must be one of auto, fsdp, ddp, tp, none, got 'bogus'"):
        config.TrainConfig(data="d", output_dir="o", preset="tiny", tokenizer="t", parallel="bogus").check()
