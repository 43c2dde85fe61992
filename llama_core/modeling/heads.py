"""Task heads on the decoder: sequence classification and extractive question answering.

Parameter names, pooling and losses follow transformers so its checkpoints and training recipes carry over.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import Cache
from .config import LlamaConfig
from .model import LlamaModel, one_cache
from .outputs import QuestionAnsweringOutput, SequenceClassifierOutput
from .pretrained import LlamaPreTrainedModel

logger = logging.getLogger(__name__)


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """Scores ``num_labels`` classes from the hidden state of each row's last non-padding token."""

    _init_if_missing = ("score.weight",)
    _ignore_if_unexpected = ("lm_head.weight",)

    @classmethod
    def _head_parameters(cls, config: LlamaConfig) -> int:
        return config.num_labels * config.hidden_size

    def __init__(self, config: LlamaConfig, init: bool = True, kernels: str | None = None):
        super().__init__(config, kernels)
        self.model = LlamaModel(self.config, init=False)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool = False, labels: Tensor | None = None, output_hidden_states: bool = False,
                inputs_embeds: Tensor | None = None, cache: Cache | None = None) -> SequenceClassifierOutput:
        """``cache`` is transformers' newer name for ``past_key_values``; either is accepted."""
        past_key_values = one_cache(past_key_values, cache)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, inputs_embeds,
                         output_hidden_states)
        logits = self.score(out.last_hidden_state)  # [b, t, labels]
        b = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None:
            if b != 1:
                raise ValueError("batches of more than one row need config.pad_token_id to find each row's end")
            last = torch.full((1,), -1, device=logits.device)
        elif input_ids is not None:
            # Rightmost non-padding token; works for left and right padding alike.
            real = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        else:
            logger.warning("padding cannot be detected from inputs_embeds; pooling the last position")
            last = torch.full((b,), -1, device=logits.device)
        pooled = logits[torch.arange(b, device=logits.device), last]  # [b, labels]
        loss = self.loss(pooled, labels) if labels is not None else None
        return SequenceClassifierOutput(pooled, loss, out.past_key_values, out.hidden_states)

    def loss(self, pooled: Tensor, labels: Tensor) -> Tensor:
        """Regression (MSE) for one label, cross entropy for integer labels, else multi-label BCE."""
        n = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            if n == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem
        labels = labels.to(pooled.device)
        if problem == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels)
        raise ValueError(f"unknown config.problem_type {problem!r}")


class LlamaForQuestionAnswering(LlamaPreTrainedModel):
    """Start and end logits per token for span extraction."""

    # transformers keeps the historical name "transformer" for this head's decoder (state-dict compatible).
    base_model_prefix = "transformer"
    _init_if_missing = ("qa_outputs.weight", "qa_outputs.bias")
    _ignore_if_unexpected = ("lm_head.weight",)

    @classmethod
    def _head_parameters(cls, config: LlamaConfig) -> int:
        return 2 * config.hidden_size + 2

    def __init__(self, config: LlamaConfig, init: bool = True, kernels: str | None = None):
        super().__init__(config, kernels)
        self.transformer = LlamaModel(self.config, init=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        if init:
            self.init_weights()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, start_positions: Tensor | None = None,
                end_positions: Tensor | None = None, output_hidden_states: bool = False,
                inputs_embeds: Tensor | None = None) -> QuestionAnsweringOutput:
        out = self.transformer(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                               output_hidden_states=output_hidden_states)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the sequence are clamped to an ignored index, as in transformers.
            ignored = start.shape[1]
            s = start_positions.reshape(-1).to(start.device).clamp(0, ignored)
            e = end_positions.reshape(-1).to(end.device).clamp(0, ignored)
            loss = (F.cross_entropy(start, s, ignore_index=ignored) + F.cross_entropy(end, e, ignore_index=ignored)) / 2
        return QuestionAnsweringOutput(start, end, loss, out.hidden_states)
