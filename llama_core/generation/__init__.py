"""Text generation as small functions outside the model (gpt-fast style).

Modules: ``api`` (``generate`` / ``stream_generate`` and their results), ``plan`` (the arguments checked and
resolved), ``decode_loop`` (prefill, then one token per row per step, eager or through a compiled step),
``sampling`` (logits processors and token sampling) and ``beam_search``.

May import: ``llama_core.modeling`` (the caches; the model is passed in) and torch. A tokenizer is any object
with ``decode(ids) -> str``, so this package never imports ``llama_core.tokenizer``.
"""

from .api import GenerationOutput, generate, stream_generate

__all__ = ["GenerationOutput", "generate", "stream_generate"]
