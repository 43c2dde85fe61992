"""LoRA adapters (Hu et al. 2021) on the model's linear layers, and their PEFT file format.

    from llama_core.lora import LoraConfig, add_lora, save_adapter, load_adapter, merge_and_unload
    add_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj")))  # base frozen
    ...train...
    save_adapter(model, "out/adapter")          # PeftModel.from_pretrained(hf_model, "out/adapter") loads it
    load_adapter(other_model, "peft_adapter/")  # PEFT's adapters load here
    merge_and_unload(model)                     # plain linears again, the adapters folded into the weights

Modules: ``config`` (LoraConfig and its PEFT ``adapter_config.json`` form), ``layer`` (LoraLinear: an adapter
around an nn.Linear or a weight-only int8 Int8Linear), ``inject`` (adding, merging and removing adapters by
HF module names), ``peft_format`` (saving and loading adapter directories).

May import: torch, safetensors, ``llama_core.quant`` (int8 base layers) and ``llama_core.model_io`` (atomic
writers, safetensors writer). Not the model: adapters attach to any module tree with HF-named linears.
"""

from .config import LORA_TARGETS, LoraConfig
from .inject import (
    adapter_state_dict,
    add_lora,
    is_adapter_key,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from .layer import LoraLinear
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter, save_adapter

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LORA_TARGETS", "LoraConfig", "LoraLinear", "adapter_state_dict", "add_lora",
    "is_adapter_key", "load_adapter", "lora_layers", "merge_and_unload", "merge_lora", "read_adapter", "save_adapter", "unload_lora",
    "unmerge_lora",
]
