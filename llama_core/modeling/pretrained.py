"""LlamaPreTrainedModel: what every public model shares (construction, I/O, training helpers).

Kept apart from the forward code so model.py reads as the architecture alone.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernels._runtime import KERNEL_SETTINGS

from ..quant import Int8Linear
from .attention import ATTN_IMPLEMENTATIONS, Attention
from .config import LlamaConfig
from .layers import MLP, RMSNorm

logger = logging.getLogger(__name__)


class ModelTooLargeError(MemoryError, ValueError):
    """A model whose parameters cannot fit in the memory of the device it is being built on."""


def decoder_parameters(config: LlamaConfig) -> int:
    """Parameters of the decoder (embeddings, layers, final norm) that ``config`` describes, from arithmetic
    alone: nothing is allocated, so it can bound a config before any module is built."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + (q + 2 * kv + c.hidden_size) * c.attention_bias
    mlp = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    layer = attention + mlp + 2 * c.hidden_size  # + the two RMSNorm weights
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size


def available_memory(device: torch.device) -> int | None:
    """Bytes a model may use on ``device``: physical memory on the CPU, free memory on CUDA; None (unknown:
    no check) elsewhere, and on ``meta``, which holds no data."""
    if device.type == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


class LlamaPreTrainedModel(nn.Module):
    # Attribute holding the LlamaModel; its state-dict keys start with "<prefix>." ("" for LlamaModel itself).
    base_model_prefix = "model"
    # Keys a head adds on top of a base checkpoint: initialised (with a warning) when a checkpoint lacks them.
    _init_if_missing: tuple[str, ...] = ()
    # Checkpoint keys a head model may drop silently (e.g. lm_head when fine-tuning a classifier).
    _ignore_if_unexpected: tuple[str, ...] = ()

    def __init__(self, config: LlamaConfig, kernels: str | None = None):
        """``kernels``: "auto" (Triton on CUDA when installed), "triton" or "torch"; default config.kernels."""
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config if kernels is None else config.replace(kernels=kernels)
        self._check_fits_in_memory()

    @classmethod
    def _head_parameters(cls, config: LlamaConfig) -> int:
        """Parameters the model adds on top of the decoder (its head); overridden by each head."""
        return 0

    def _check_fits_in_memory(self) -> None:
        """Refuse, with the number of bytes, a model whose parameters alone exceed the memory of the device
        it is being built on (torch's default device: ``with torch.device(...)`` or set_default_device), before
        anything is allocated: an absurd config otherwise fails deep inside the allocator, or swaps for hours."""
        device = torch.empty(0).device  # the default device; meta for the loader's storage-free skeleton
        available = available_memory(device)
        if available is None:
            return
        count = decoder_parameters(self.config) + self._head_parameters(self.config)
        dtype = torch.get_default_dtype()
        needed = count * dtype.itemsize
        if needed > available:
            raise ModelTooLargeError(
                f"{type(self).__name__} with this config has {count:,} parameters: {needed:,} bytes in {dtype}, "
                f"more than the {available:,} bytes of {'free' if device.type == 'cuda' else 'physical'} memory "
                f"on {device}; shrink the config, or build it on the meta device (with torch.device('meta'))")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaPreTrainedModel:
        """A random-init model of a known release's shape (see llama_core.modeling.presets)."""
        return cls(LlamaConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **kwargs: Any) -> LlamaPreTrainedModel:
        """Load a local directory or hub id; see :func:`llama_core.model_io.loading.load_pretrained` for options."""
        from ..model_io.loading import load_pretrained  # documented lazy import: model_io builds on modeling

        return load_pretrained(cls, path_or_hub_id, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        tokenizer: Any = None) -> Path:
        """Write config.json and safetensors weights (sharded above ``max_shard_size``), atomically; with
        ``tokenizer`` (a llama_core Tokenizer) its files too, in the same step, so the directory is complete
        for ``from_pretrained`` and ``llama-core generate --model``."""
        from ..model_io.saving import save_pretrained  # documented lazy import, as from_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size, tokenizer=tokenizer)

    def quantize(self, mode: Any = "int8", threshold: float | None = None, skip: Any = None) -> LlamaPreTrainedModel:
        """int8-quantise the linear layers in place (see :func:`llama_core.quant.quantize`)."""
        from ..quant import quantize

        return quantize(self, mode, threshold=threshold, skip=skip)

    def dequantize(self, dtype: torch.dtype | None = None) -> LlamaPreTrainedModel:
        """Back to full-precision nn.Linear layers, in place (see :func:`llama_core.quant.dequantize`)."""
        from ..quant import dequantize

        return dequantize(self, dtype)

    def init_weights(self) -> None:
        """HF initialisation: normal(0, initializer_range) linears and embeddings, zero biases and padding row."""
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix) if self.base_model_prefix else self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self, "lm_head", None)

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix when the config says the embeddings are tied. An int8
        lm_head (``quant``) keeps its own quantised copy instead: an int8 matrix cannot share a float one."""
        head = self.get_output_embeddings()
        if head is not None and self.config.tie_word_embeddings and type(head) is not Int8Linear:
            head.weight = self.get_input_embeddings().weight

    # ------------------------------------------------------------------ introspection
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count; shared (tied) tensors are counted once."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def floating_point_ops(self, num_tokens: int, seq_len: int | None = None, training: bool = True) -> int:
        """FLOPs to process ``num_tokens`` tokens, for MFU (PaLM appendix B convention).

        Per token, each weight of a matmul costs 2 FLOPs forward (the embedding lookup costs none, a tied
        lm_head still costs its matmul); with ``seq_len`` the attention scores and weighted sum add
        ``4 * layers * heads * head_dim * seq_len`` (causality not subtracted, as PaLM). Training (forward +
        backward) is 3x the forward.
        """
        c = self.config
        per_layer = (c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
                     + 3 * c.hidden_size * c.intermediate_size)
        head = c.hidden_size * (self.config.num_labels if self.get_output_embeddings() is None else c.vocab_size)
        forward = 2 * (c.num_hidden_layers * per_layer + head)
        if seq_len:
            forward += 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return (3 if training else 1) * forward * num_tokens

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by parameters (and buffers), shared tensors counted once."""
        tensors = {id(t): t for t in self.parameters()}
        if return_buffers:
            tensors.update({id(t): t for t in self.buffers()})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ------------------------------------------------------------------ switches
    def set_attn_implementation(self, name: str) -> None:
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
        self.config.attn_implementation = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = name

    def set_kernels(self, name: str) -> None:
        """Switch the fast ops between "auto", "triton" and "torch": the RMSNorm and RoPE kernels (see kernels/)
        and the CPU decode reduction of the linear layers (``modeling.linear``; "torch" turns it off)."""
        if name not in KERNEL_SETTINGS:
            raise ValueError(f"kernels must be one of {KERNEL_SETTINGS}, got {name!r}")
        self.config.kernels = name
        for module in self.modules():
            if isinstance(module, (Attention, MLP, RMSNorm)):
                module.kernels = name

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in backward instead of storing its activations."""
        self.base_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model.gradient_checkpointing

    def resize_token_embeddings(self, new_num_tokens: int, pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows start at the mean of the old ones (as transformers'
        mean_resizing), kept rows are unchanged, tied weights stay tied."""
        if pad_to_multiple_of:
            new_num_tokens = math.ceil(new_num_tokens / pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        pad = self.config.pad_token_id
        if pad is not None and not -new_num_tokens <= pad < new_num_tokens:
            raise ValueError(f"pad_token_id {pad} does not fit a vocabulary of {new_num_tokens}")
        old = self.get_input_embeddings()
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=pad,
                           device=old.weight.device, dtype=old.weight.dtype)
        new.weight.data = _resized_rows(old.weight.data, new_num_tokens)
        self.base_model.embed_tokens = new
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = nn.Linear(head.in_features, new_num_tokens, bias=False,
                                 device=head.weight.device, dtype=head.weight.dtype)
            new_head.weight.data = _resized_rows(head.weight.data, new_num_tokens)
            self.lm_head = new_head
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return new


def _resized_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    kept = min(rows, weight.shape[0])
    out = weight.new_empty(rows, weight.shape[1])
    out[:kept] = weight[:kept]
    if rows > kept:
        out[kept:] = weight.float().mean(dim=0).to(weight.dtype)
    return out
