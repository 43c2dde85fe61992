"""Lazy package attributes (PEP 562), as transformers' lazy module and scientific-python's lazy_loader do it:
a package lists ``module -> names`` in a ``_LAZY_IMPORTS`` table and each name is imported on first use, so
``import llama_core`` (and ``llama-core --help``) imports no torch. tests/test_import_layers.py reads the
tables as the imports they stand for; tests/test_cli_startup.py checks them against ``__all__`` and the
packages' TYPE_CHECKING blocks."""

from __future__ import annotations

import importlib
from typing import Any


def install_lazy_imports(namespace: dict[str, Any], table: dict[str, tuple[str, ...]]) -> None:
    """Give the package whose globals are ``namespace`` a ``__getattr__`` that imports each name of
    ``table`` from its module on first use (then caches it, so it runs once per name) and a ``__dir__``
    that lists them; ``_MODULE_OF`` (name -> module) is set beside them."""
    package = namespace["__name__"]
    module_of = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of[name], package), name)
        namespace[name] = value  # found by plain lookup from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    namespace.update(__getattr__=__getattr__, __dir__=__dir__, _MODULE_OF=module_of)
