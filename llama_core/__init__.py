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

from ._version import __version__
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
