"""LlamaModel (the decoder stack) and LlamaForCausalLM (decoder + language-model head)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import build_attention_mask
from .cache import Cache, DynamicCache, StaticCache
from .config import LlamaConfig
from .document_attention import packed_attention_mask
from .fused_loss import lm_head_loss
from .layers import DecoderLayer, RMSNorm
from .linear import linear
from .outputs import BaseModelOutput, CausalLMOutput
from .pretrained import LlamaPreTrainedModel
from .rope import RotaryEmbedding


class LlamaModel(LlamaPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` decoder layers and the final norm."""

    base_model_prefix = ""
    _ignore_if_unexpected = ("lm_head.weight",)  # loading a causal-LM checkpoint into the bare decoder

    def __init__(self, config: LlamaConfig, init: bool = True, kernels: str | None = None):
        super().__init__(config, kernels)
        config = self.config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernels)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, inputs_embeds: Tensor | None = None,
                output_hidden_states: bool = False, cache_position: Tensor | None = None,
                cache: Cache | None = None) -> BaseModelOutput:
        """``cache`` is transformers' newer name for ``past_key_values`` (>= 5.24); either is accepted."""
        past_key_values = one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, t, h]
        b, t = x.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        static = isinstance(cache, StaticCache)
        # Tokens already cached. Unknown (None) only for a StaticCache given cache_position, the compiled
        # decode path, where reading the device-side length would cost a sync and a graph break.
        past = 0 if cache is None else None if static and cache_position is not None else cache.get_seq_length()
        if past is not None:
            if static:
                cache.check_room(b, t, past)
            _check_mask(attention_mask, b, t, cache.max_cache_len if static else past + t, past)
        if cache_position is None:
            cache_position = torch.arange(past, past + t, device=x.device)
        # As transformers: position_ids that restart, with no attention_mask and no cache, are packed documents
        packed = position_ids is not None and attention_mask is None and cache is None
        if position_ids is None:
            position_ids = _position_ids(attention_mask, cache_position, b, t)

        key_positions = None
        if cache is not None and self.rotary_emb.is_dynamic:
            key_positions = cache.update_positions(position_ids, cache_position)
        rope = self.rotary_emb(position_ids, x.dtype, key_positions)
        kv_len = cache.max_cache_len if static else past + t
        can_skip = not static and (past == 0 or t == 1)
        if packed:
            mask = packed_attention_mask(position_ids.to(x.device), b, self.config.attn_implementation,
                                         _compute_dtype(x), self.config.attention_dropout if self.training else 0.0)
        else:
            mask = build_attention_mask(attention_mask, cache_position, kv_len, can_skip)

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            device = layer.input_layernorm.weight.device
            if x.device != device:  # a model split across devices (device_map): hand over at the boundary
                x, rope = x.to(device), rope.to(device)
                mask = None if mask is None else mask.to(device)
                cache_position = cache_position.to(device)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, cache, cache_position, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, cache_position)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x.to(self.norm.weight.device))
        if hidden_states is not None:
            hidden_states[-1] = x  # as transformers: the last entry is the normed output
        return BaseModelOutput(x, cache if use_cache or past_key_values is not None else None,
                               tuple(hidden_states) if hidden_states is not None else None)


def one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The KV cache passed under either name: transformers 5.24 renamed forward's ``past_key_values`` to
    ``cache`` (the old name deprecated); code written for either version works here. Both at once is an error
    rather than a silent choice between two caches."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache as cache= or as its older name past_key_values=, not both")
    return cache if cache is not None else past_key_values


def _check_mask(attention_mask: Tensor | None, b: int, t: int, kv_len: int, past: int) -> None:
    """A 2-D padding mask ``[b, past + t]`` or a 4-D boolean ``[b, 1, t, kv_len]`` (True = may attend)."""
    if attention_mask is None:
        return
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape != (b, 1, t, kv_len):
            raise ValueError(f"a 4-D attention_mask must be boolean (True = may attend) of shape (batch, 1, "
                             f"new tokens, key slots) = {(b, 1, t, kv_len)}; got {attention_mask.dtype} "
                             f"{tuple(attention_mask.shape)}")
    elif attention_mask.shape != (b, past + t):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new "
                         f"tokens) = {(b, past + t)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention will run in: autocast's where it is on (the embeddings stay fp32 under it)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _position_ids(attention_mask: Tensor | None, cache_position: Tensor, b: int, t: int) -> Tensor:
    """Positions of the new tokens: counted over real tokens only, so left padding shifts nothing.
    A 4-D mask says nothing about positions (packed documents pass their own position_ids)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return cache_position[None, :].expand(b, t)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -t:].to(cache_position.device)


class LlamaForCausalLM(LlamaPreTrainedModel):
    """The decoder with a language-model head; ``lm_head`` shares the embedding when tied."""

    @classmethod
    def _head_parameters(cls, config: LlamaConfig) -> int:
        return 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size

    def __init__(self, config: LlamaConfig, init: bool = True, kernels: str | None = None):
        super().__init__(config, kernels)
        self.model = LlamaModel(self.config, init=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if init:
            self.init_weights()
        self.tie_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, labels: Tensor | None = None, output_hidden_states: bool = False,
                inputs_embeds: Tensor | None = None, cache_position: Tensor | None = None,
                logits_to_keep: int = 0, cache: Cache | None = None, skip_logits: bool = False,
                shift_labels: Tensor | None = None,
                num_items_in_batch: Tensor | int | None = None) -> CausalLMOutput:
        """``labels [batch, seq]`` are the input ids themselves (shifted here); -100 is ignored.
        ``shift_labels [batch, seq]`` instead are already aligned with the positions (packed training
        windows); ``num_items_in_batch`` makes the loss the sum over targets divided by it (transformers'
        names for both). ``skip_logits=True`` computes the loss in chunks of tokens without ever building the
        full logits (``llama_core.modeling.fused_loss``); ``.logits`` is then None.

        ``logits_to_keep=n`` computes logits for the last n positions only (generation needs one).
        ``cache`` is transformers' newer name for ``past_key_values``; either is accepted.
        """
        past_key_values = one_cache(past_key_values, cache)
        targets = _loss_targets(labels, shift_labels, skip_logits, logits_to_keep)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, inputs_embeds,
                         output_hidden_states, cache_position)
        h = out.last_hidden_state
        if skip_logits:
            loss = lm_head_loss(self.lm_head, h, targets, num_items_in_batch=num_items_in_batch)
            return CausalLMOutput(None, loss, out.past_key_values, out.hidden_states)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = linear(self.lm_head, h.to(self.lm_head.weight.device), self.config.kernels)
        loss = None
        if targets is not None:
            loss = causal_lm_loss(logits, shift_labels=targets, num_items_in_batch=num_items_in_batch)
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)

    def generate(self, input_ids: Tensor, **kwargs: Any) -> Any:
        """Continue ``input_ids``; see :func:`llama_core.generation.generate` for the options."""
        # Documented lazy import: generation sits above the model (its decode loop drives one), so the
        # HF-style method reaches up into it only when called.
        from ..generation import generate

        return generate(self, input_ids, **kwargs)


def causal_lm_loss(logits: Tensor, labels: Tensor | None = None, ignore_index: int = -100, *,
                   shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    """Mean next-token cross entropy in fp32: position i predicts ``labels[i + 1]`` (or ``shift_labels[i]``);
    with ``num_items_in_batch``, the sum over targets divided by it."""
    targets = shift_targets(labels, ignore_index) if shift_labels is None else shift_labels
    flat = logits.float().reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(*flat, ignore_index=ignore_index)
    return F.cross_entropy(*flat, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def shift_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``labels [b, t]`` -> the target of each position ``[b, t]``: the next label, ignore_index at the end."""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:]


def _loss_targets(labels: Tensor | None, shift_labels: Tensor | None, skip_logits: bool,
                  logits_to_keep: int) -> Tensor | None:
    """The aligned targets of forward's loss, or None; checked before the decoder runs."""
    if labels is not None and shift_labels is not None:
        raise ValueError("pass labels (shifted inside) or shift_labels (already shifted), not both")
    if skip_logits and labels is None and shift_labels is None:
        raise ValueError("skip_logits=True returns only the loss, so it needs labels= (or shift_labels=); "
                         "without them pass skip_logits=False to get the logits")
    if skip_logits and logits_to_keep:
        raise ValueError("skip_logits=True computes no logits, so logits_to_keep does not apply; pass one of them")
    return shift_targets(labels) if labels is not None else shift_labels
