"""Text to ids and back: the ``Tokenizer`` face over the file formats Llama models ship with.

Modules: ``tokenizer`` (the Tokenizer class: BOS/EOS, padded batches, chat prompts, decoding), ``backends``
(sentencepiece, Llama 3 tiktoken and HF tokenizer.json, behind one small interface), ``gguf_vocab`` (a GGUF
file's vocabulary metadata as a tokenizer) and ``gguf_export`` (a tokenizer as GGUF metadata, for GGUF writers),
``tiktoken_llama3`` (Meta's Llama 3 recipe: split pattern, special tokens), ``detokenize`` (ids -> bytes -> text,
incrementally for streaming) and ``chat_template`` (sandboxed Jinja templates and the built-in Llama 2/3 formats).

May import: ``llama_core.model_io`` (hub ids, the GGUF container reader, atomic file writes),
``llama_core.modeling.config`` (its JSON-object reader), sentencepiece, tiktoken, tokenizers, jinja2, and gguf
(lazily, inside functions). Never the model or generation: generation takes any object with
``decode(ids) -> str``.
"""

from .detokenize import IncrementalDecoder
from .gguf_export import GGUFMetadataValue, add_tokenizer_metadata, gguf_tokenizer_metadata, save_gguf_vocab
from .tokenizer import TOKENIZER_FILES, Tokenizer

__all__ = ["TOKENIZER_FILES", "GGUFMetadataValue", "IncrementalDecoder", "Tokenizer", "add_tokenizer_metadata",
           "gguf_tokenizer_metadata", "save_gguf_vocab"]
