"""llama-core: a from-scratch Llama decoder in pure PyTorch with exact Hugging Face parity."""

from .cache import Cache, DynamicCache, StaticCache
from .config import LlamaConfig
from .generation import GenerationOutput, generate, stream_generate
from .heads import LlamaForQuestionAnswering, LlamaForSequenceClassification
from .model import LlamaForCausalLM, LlamaModel
from .outputs import BaseModelOutput, CausalLMOutput, QuestionAnsweringOutput, SequenceClassifierOutput
from .presets import PRESETS, preset_names
from .pretrained import LlamaPreTrainedModel
from .quant import Int8Config, Int8Linear, dequantize, quantize
from .tokenizer import IncrementalDecoder, Tokenizer

__version__ = "0.1.0"

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
    "dequantize",
    "generate",
    "preset_names",
    "quantize",
    "stream_generate",
]
