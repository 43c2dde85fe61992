"""save_pretrained: config.json + safetensors (sharded with an index above max_shard_size), atomically.

Everything is written into a temporary sibling directory which then replaces the target with renames,
so a crash leaves either the old checkpoint or the new one, never a mix. Files in an existing target
that are not ours (generation config, README; the tokenizer unless a new one is written with it) are
carried over. Tensors are streamed to disk
one at a time, so saving needs no memory beyond the model itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import torch

from ..quant import Int8Linear
from .atomic import atomic_directory
from .hf_checkpoint import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE
from .placement import parse_size
from .safetensors_writer import write_sharded

logger = logging.getLogger(__name__)


class TokenizerFiles(Protocol):
    """What saving needs of a tokenizer (llama_core's Tokenizer; model_io sits below the tokenizer package,
    so it asks for the behaviour instead of importing the class)."""

    SAVED_FILES: frozenset[str]  # every file name a tokenizer save may write: older ones are not carried over

    def files_to_save(self) -> dict[str, bytes]: ...


def is_weights_or_config(name: str) -> bool:
    """Files a checkpoint save owns (replaced, never carried over)."""
    return (name in ("config.json", SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)
            or (name.startswith("model-") and name.endswith(".safetensors"))
            or (name.startswith("pytorch_model-") and name.endswith(".bin")))


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors; a tied lm_head is omitted (as transformers does), unless it is an int8 copy of the
    embedding (an Int8Linear), which is its own tensor."""
    state = model.state_dict()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if model.config.tie_word_embeddings and "lm_head.weight" in state and type(head) is not Int8Linear:
        state.pop("lm_head.weight")
    adapters = [k for k in state if ".lora_A." in k or ".base_layer." in k]
    if adapters:  # names transformers cannot read; llama_core.lora writes adapters in PEFT's own files
        raise ValueError(f"the model holds unmerged LoRA adapters ({adapters[0]}, ...): save them with "
                         f"llama_core.lora.save_adapter, or fold them in with llama_core.lora.merge_and_unload "
                         f"before save_pretrained")
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device (never loaded): {', '.join(meta[:5])}")
    return {k: t.detach() for k, t in state.items()}


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    tokenizer: TokenizerFiles | None = None) -> Path:
    """config.json and safetensors weights, plus ``tokenizer``'s files when given, in one atomic directory swap:
    readers see the old directory or the complete new one, and a failure anywhere (a tokenizer that cannot be
    written included) leaves the old one untouched. Other files of an existing directory are carried over,
    except old tokenizer files when a tokenizer is written (a stale tokenizer.json would win over a new
    tokenizer.model)."""
    if tokenizer is not None and not (callable(getattr(tokenizer, "files_to_save", None))
                                      and isinstance(getattr(tokenizer, "SAVED_FILES", None), frozenset)):
        raise TypeError(f"tokenizer must be a llama_core Tokenizer, got {type(tokenizer).__name__}")
    limit = parse_size(max_shard_size)
    state = state_dict_for_saving(model)
    config = model.config.replace(dtype=str(model.dtype).removeprefix("torch."))
    specs = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
    owned = tokenizer.SAVED_FILES if tokenizer is not None else frozenset()
    with atomic_directory(directory, keep=lambda name: not is_weights_or_config(name) and name not in owned) as tmp:
        config.save_pretrained(tmp)
        files = write_sharded(tmp, specs, iter(state.items()), limit)
        if tokenizer is not None:
            for name, data in tokenizer.files_to_save().items():
                (tmp / name).write_bytes(data)
    target = Path(directory).expanduser().absolute()
    logger.info("saved %s (%d file%s) to %s", type(model).__name__, len(files), "s" * (len(files) > 1), target)
    return target
