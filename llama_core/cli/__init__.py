"""The ``llama-core`` command line: the entry point (``main``) and one module per command.

``summary``, ``generate``, ``chat`` (with ``generation_options``, what those two share), ``bench``, ``train``
and ``convert``; each has ``add_parser(sub)`` that registers it and a function that runs it.

May import everything below it: ``llama_core``'s other packages and ``checkpoints_convert``. Nothing
imports this package (its entry point is the console script and ``python -m llama_core.cli``).
"""

from .main import main

__all__ = ["main"]
