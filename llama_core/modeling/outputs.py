"""Output records of the public models (attribute access, as in transformers)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .cache import Cache


@dataclass
class BaseModelOutput:
    last_hidden_state: Tensor  # [batch, seq, hidden], after the final norm
    past_key_values: Cache | None = None
    # (embeddings, after layer 1, ..., after layer n-1, final normed output): num_hidden_layers + 1 entries
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # [batch, seq, vocab]; None with skip_logits=True (the loss never built them)
    loss: Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput:
    logits: Tensor  # [batch, num_labels], pooled at the last non-padding token
    loss: Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class QuestionAnsweringOutput:
    start_logits: Tensor  # [batch, seq]
    end_logits: Tensor  # [batch, seq]
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
