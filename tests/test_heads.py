"""Task heads against transformers' heads on the same weights: pooling, logits and every loss type."""

from __future__ import annotations

import pytest
import torch

from llama_core import LlamaForQuestionAnswering, LlamaForSequenceClassification
from tests.conftest import small_config

ATOL = 1e-4


def pair(transformers, tmp_path, ours_cls, ref_cls, **fields):
    torch.manual_seed(0)
    ours = ours_cls(small_config(pad_token_id=0, **fields)).eval()
    ours.save_pretrained(tmp_path)
    ref = getattr(transformers, ref_cls).from_pretrained(tmp_path, attn_implementation="eager").eval()
    return ours, ref


def padded_batch():
    ids = torch.randint(1, 128, (3, 9))
    ids[0, :3] = 0  # left padded
    ids[1, 6:] = 0  # right padded
    return ids


@pytest.mark.parametrize(("num_labels", "labels"), [
    (1, torch.tensor([0.5, -1.0, 2.0])),                             # regression
    (3, torch.tensor([0, 2, 1])),                                    # single-label
    (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [0, 1, 0]])),          # multi-label
], ids=["regression", "single-label", "multi-label"])
def test_sequence_classification_matches_transformers(transformers_module, tmp_path, num_labels, labels):
    ours, ref = pair(transformers_module, tmp_path, LlamaForSequenceClassification,
                     "LlamaForSequenceClassification", num_labels=num_labels)
    ids = padded_batch()
    mask = (ids != 0).long()
    out, ref_out = ours(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, num_labels)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=0)


def test_sequence_classification_pools_the_last_real_token():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(small_config(pad_token_id=0, num_labels=2)).eval()
    seq = torch.randint(1, 128, (1, 5))
    padded = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)  # right padding, causal: no effect
    torch.testing.assert_close(model(padded).logits, model(seq).logits, atol=1e-6, rtol=0)
    no_pad = LlamaForSequenceClassification(small_config(num_labels=2))
    with pytest.raises(ValueError, match="pad_token_id"):
        no_pad(torch.randint(1, 128, (2, 4)))


def test_question_answering_matches_transformers(transformers_module, tmp_path):
    ours, ref = pair(transformers_module, tmp_path, LlamaForQuestionAnswering, "LlamaForQuestionAnswering")
    assert "transformer.embed_tokens.weight" in ours.state_dict()
    ids = torch.randint(1, 128, (2, 11))
    start, end = torch.tensor([2, 40]), torch.tensor([[5], [3]])  # 40 is out of range: clamped and ignored
    out = ours(ids, start_positions=start, end_positions=end)
    ref_out = ref(ids, start_positions=start, end_positions=end)
    torch.testing.assert_close(out.start_logits, ref_out.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.end_logits, ref_out.end_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=0)
