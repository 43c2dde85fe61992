"""Beam search, step for step the vectorised algorithm of transformers' ``GenerationMixin._beam_search``
(transformers >= 4.50), so sequences and ``sequences_scores`` match theirs.

Per prompt, ``num_beams`` running beams; each step the top ``K = max(2, 1 + n_eos) * num_beams``
continuations over all beams are taken (enough that ``num_beams`` of them are not EOS). Candidates that
end (EOS or the length limit) among the top ``num_beams`` join a pool of finished hypotheses scored
``sum(logprobs) / new_len ** length_penalty``; the best ``num_beams`` others keep running. ``early_stopping``:
True stops a prompt when ``num_beams`` hypotheses are finished; False (the default) when the best running
beam, scored at its current length, cannot beat the worst finished one; "never" scores it at the maximum
length when ``length_penalty > 0`` (the canonical stopping rule). Scores are log-softmax of the logits,
then the processors (as transformers: the penalty and n-gram ban act on log-probabilities).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .sampling import LogitsSettings, process_logits

_NEG = -1.0e9  # transformers' "impossible" score; kept finite so sums and comparisons stay well defined


class StepRunner(Protocol):
    """What beam search needs from the model side (``decode_loop._Runner``)."""

    def prefill(self, ids: Tensor) -> Tensor: ...
    def step(self, tokens: Tensor) -> Tensor: ...
    def reorder(self, index: Tensor) -> None: ...


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """Select along the beam axis: ``t [batch, beams, ...]``, ``index [batch, k]`` -> ``[batch, k, ...]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(runner: StepRunner, ids: Tensor, mask: Tensor | None, *, num_beams: int, max_new_tokens: int,
                settings: LogitsSettings, eos: list[int], pad: int | None, length_penalty: float,
                early_stopping: bool | str, num_return_sequences: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``ids [batch * num_beams, prompt]`` (each prompt repeated ``num_beams`` times) ->
    ``(sequences [batch * num_return_sequences, prompt + new], token logprobs [.., new], scores [..])``.

    Finished hypotheses are padded with ``pad`` (transformers fills with ``pad or eos[0]``, so the two differ
    only when pad is 0). Sampling (``settings.do_sample``) draws the K candidates without replacement.
    """
    rows, prompt = ids.shape
    batch, device = rows // num_beams, ids.device
    max_len = prompt + max_new_tokens
    keep = max(2, 1 + len(eos)) * num_beams
    in_top = torch.arange(keep, device=device) < num_beams  # only the top num_beams candidates may finish
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    fill = pad if pad is not None else (eos[0] if eos else 0)
    valid = None if mask is None else torch.cat([mask.bool(), mask.new_ones(rows, max_new_tokens).bool()], 1)

    running = torch.full((batch, num_beams, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :prompt] = ids.view(batch, num_beams, prompt)
    running_lp = torch.zeros(batch, num_beams, max_new_tokens, device=device)  # per-token logprobs
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: let only the first one expand at step 0
    finished, finished_lp = running.clone(), running_lp.clone()
    finished_scores = torch.full((batch, num_beams), _NEG, device=device)
    finished_len = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    logits = runner.prefill(ids)
    vocab = logits.shape[-1]
    for cur in range(prompt, max_len):
        step, new_len = cur - prompt, cur + 1 - prompt
        flat = running[:, :, :cur].reshape(rows, cur)
        log_probs = process_logits(logits.log_softmax(-1), settings, flat, None if valid is None else valid[:, :cur])
        log_probs = log_probs.view(batch, num_beams * vocab)
        total = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if settings.do_sample:
            top = torch.multinomial(total.softmax(-1), keep, generator=generator)
            top_scores = total.gather(1, top)
        else:
            top_scores, top = torch.topk(total, keep)
        parent, token = top // vocab, top % vocab  # [batch, keep]
        cand = _gather(running, parent)
        cand[:, :, cur] = token
        cand_lp = _gather(running_lp, parent)
        cand_lp[:, :, step] = log_probs.gather(1, top)
        ends = torch.isin(token, eos_t) | (cur + 1 >= max_len)  # [batch, keep]

        # Running beams: the best num_beams candidates that did not end.
        alive_scores = top_scores + ends.float() * _NEG
        best = torch.topk(alive_scores, num_beams).indices
        running, running_lp = _gather(cand, best), _gather(cand_lp, best)
        running_scores = _gather(alive_scores, best)
        source = _gather(parent, best) + torch.arange(batch, device=device)[:, None] * num_beams

        # Finished pool: merge the candidates that ended (among the top num_beams) if they score higher.
        just = ends & in_top[None]
        # (Added one term at a time, in transformers' order, so even the "impossible" scores agree bitwise.)
        scores = top_scores / new_len**length_penalty
        scores = scores + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * _NEG
        scores = scores + (~improvable).float() * _NEG
        scores = scores + (~just).float() * _NEG
        merged = torch.topk(torch.cat([finished_scores, scores], 1), num_beams).indices
        finished = _gather(torch.cat([finished, cand], 1), merged)
        finished_lp = _gather(torch.cat([finished_lp, cand_lp], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, scores], 1), merged)
        finished_len = _gather(torch.cat([finished_len, torch.full_like(scores, new_len, dtype=torch.long)], 1),
                               merged)
        is_finished = _gather(torch.cat([is_finished, just], 1), merged)

        # Can a running beam still beat the worst finished hypothesis? (transformers' heuristic)
        best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else new_len
        best_possible = running_scores[:, :1] / best_len**length_penalty
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, _NEG)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        going = bool(improvable.any()) and not (early_stopping is True and bool(is_finished.all())) \
            and not bool(ends.all())
        if not going:
            break
        runner.reorder(source.view(-1))
        logits = runner.step(running[:, :, cur].reshape(rows))

    n = num_return_sequences
    new = int(finished_len[:, :n].max())
    sequences = finished[:, :n, :prompt + new].reshape(batch * n, prompt + new)
    return sequences, finished_lp[:, :n, :new].reshape(batch * n, new), finished_scores[:, :n].reshape(-1)
