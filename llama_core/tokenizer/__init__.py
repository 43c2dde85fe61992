"""Text to ids and back: the ``Tokenizer`` face over the three file formats Llama models ship with.

Modules: ``tokenizer`` (the Tokenizer class: BOS/EOS, padded batches, chat prompts, decoding), ``backends``
(sentencepiece, Llama 3 tiktoken and HF tokenizer.json, behind one small interface), ``tiktoken_llama3``
(Meta's Llama 3 recipe: split pattern, special tokens), ``detokenize`` (ids -> bytes -> text, incrementally
for streaming) and ``chat_template`` (sandboxed Jinja templates and the built-in Llama 2/3 formats).

May import: ``llama_core.model_io.hub`` (hub ids), ``llama_core.modeling.config`` (its JSON-object reader),
sentencepiece, tiktoken, tokenizers, jinja2. Never the model or generation: generation takes any object
with ``decode(ids) -> str``.
"""

from .detokenize import IncrementalDecoder
from .tokenizer import TOKENIZER_FILES, Tokenizer

__all__ = ["TOKENIZER_FILES", "IncrementalDecoder", "Tokenizer"]
