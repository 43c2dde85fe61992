"""llama-core: a from-scratch Llama decoder in pure PyTorch with exact Hugging Face parity.

This module is the public face; the code lives in one sub-package per concern, lowest layer first:
  ``quant``        int8 quantisation of linear layers (on ``kernels``)
  ``modeling/``    the network: config, presets, rope, layers, attention, caches, models, heads
  ``model_io/``    reading and writing model checkpoints: from_pretrained, save_pretrained, hub, device maps
  ``tokenizer/``   the Tokenizer over sentencepiece, tiktoken and tokenizer.json; chat templates
  ``generation/``  generate / stream_generate: decode loop, logits processors, beam search
  ``train/``       the training loop (single device, FSDP2, DDP, tensor parallel) and its checkpoints
  ``bench/``       ``llama-core bench``: side by side with transformers
  ``cli/``         the ``llama-core`` command line
A package imports only those above it in this list (``checkpoints_convert`` sits between ``tokenizer`` and
``generation``); the few exceptions are lazy imports documented where they are made and listed in
tests/test_import_layers.py, which fails on any import circle or undocumented upward import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import install_lazy_imports
from ._version import __version__

# Lazy (PEP 562, as transformers and scientific-python's lazy_loader do it): ``import llama_core`` costs
# next to nothing and imports no torch; each name below loads its sub-package on first use, so
# ``llama-core --help`` answers at once. Module -> names, read by tests/test_import_layers.py as imports;
# the TYPE_CHECKING block says the same for type checkers and IDEs (tests/test_cli_startup.py checks that
# the two agree and that every name resolves).
_LAZY_IMPORTS = {
    ".generation": ("GenerationOutput", "generate", "stream_generate"),
    ".modeling": ("PRESETS", "BaseModelOutput", "Cache", "CausalLMOutput", "DynamicCache", "LlamaConfig",
                  "LlamaForCausalLM", "LlamaForQuestionAnswering", "LlamaForSequenceClassification", "LlamaModel",
                  "LlamaPreTrainedModel", "QuestionAnsweringOutput", "SequenceClassifierOutput", "StaticCache",
                  "preset_names"),
    ".quant": ("Int8Config", "Int8Linear", "dequantize", "quantize"),
    ".tokenizer": ("IncrementalDecoder", "Tokenizer"),
}
install_lazy_imports(globals(), _LAZY_IMPORTS)  # __getattr__, __dir__ and _MODULE_OF from the table

if TYPE_CHECKING:
    from .generation import GenerationOutput, generate, stream_generate
    from .modeling import (
        PRESETS,
        BaseModelOutput,
        Cache,
        CausalLMOutput,
        DynamicCache,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForQuestionAnswering,
        LlamaForSequenceClassification,
        LlamaModel,
        LlamaPreTrainedModel,
        QuestionAnsweringOutput,
        SequenceClassifierOutput,
        StaticCache,
        preset_names,
    )
    from .quant import Int8Config, Int8Linear, dequantize, quantize
    from .tokenizer import IncrementalDecoder, Tokenizer



__all__ = [
    "PRESETS",
    "BaseModelOutput",
    "Cache",
    "CausalLMOutput",
    "DynamicCache",
    "GenerationOutput",
    "IncrementalDecoder",
    "Int8Config",
    "Int8Linear",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForQuestionAnswering",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "LlamaPreTrainedModel",
    "QuestionAnsweringOutput",
    "SequenceClassifierOutput",
    "StaticCache",
    "Tokenizer",
    "__version__",
    "dequantize",
    "generate",
    "preset_names",
    "quantize",
    "stream_generate",
]
