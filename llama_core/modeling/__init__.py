"""The network: everything a research fork reads to understand (and change) the Llama decoder.

Read in this order: ``config`` (hyper-parameters, HF field names) and ``presets`` (known shapes), ``rope``
(rotary embeddings, one pure function per scaling type), ``linear`` (the linear layers' op boundary: the
CPU one-token decode path), ``layers`` (RMSNorm, SwiGLU MLP, decoder layer),
``attention`` (grouped-query attention and its masks), ``cache`` (dynamic and static KV caches), ``model``
(LlamaModel, LlamaForCausalLM), ``heads`` (classification, question answering), ``pretrained`` (what every
public model shares: construction, init, counts, the from_pretrained/save_pretrained face) and ``outputs``.

May import: torch and ``kernels`` (the fused ops, chosen at the op boundary), ``llama_core.quant`` (below
this package). Nothing else of llama_core, except two documented lazy imports upward, made only when
called: ``pretrained`` -> ``llama_core.model_io`` (from_pretrained / save_pretrained) and ``model`` ->
``llama_core.generation`` (``LlamaForCausalLM.generate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import install_lazy_imports

# Lazy (PEP 562): ``presets`` and ``config`` are plain Python, so the CLI can list preset names without
# importing torch (half a second to several seconds); the torch-backed names load on first use. The table is
# module -> names, read by tests/test_import_layers.py as imports; the TYPE_CHECKING block says the same for
# type checkers and IDEs (tests/test_cli_startup.py checks the two agree).
_LAZY_IMPORTS = {
    ".cache": ("Cache", "DynamicCache", "StaticCache"),
    ".config": ("LlamaConfig",),
    ".heads": ("LlamaForQuestionAnswering", "LlamaForSequenceClassification"),
    ".model": ("LlamaForCausalLM", "LlamaModel"),
    ".outputs": ("BaseModelOutput", "CausalLMOutput", "QuestionAnsweringOutput", "SequenceClassifierOutput"),
    ".presets": ("PRESETS", "preset_names"),
    ".pretrained": ("LlamaPreTrainedModel",),
}
install_lazy_imports(globals(), _LAZY_IMPORTS)  # __getattr__, __dir__ and _MODULE_OF from the table

if TYPE_CHECKING:
    from .cache import Cache, DynamicCache, StaticCache
    from .config import LlamaConfig
    from .heads import LlamaForQuestionAnswering, LlamaForSequenceClassification
    from .model import LlamaForCausalLM, LlamaModel
    from .outputs import BaseModelOutput, CausalLMOutput, QuestionAnsweringOutput, SequenceClassifierOutput
    from .presets import PRESETS, preset_names
    from .pretrained import LlamaPreTrainedModel



__all__ = [
    "PRESETS",
    "BaseModelOutput",
    "Cache",
    "CausalLMOutput",
    "DynamicCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForQuestionAnswering",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "LlamaPreTrainedModel",
    "QuestionAnsweringOutput",
    "SequenceClassifierOutput",
    "StaticCache",
    "preset_names",
]
