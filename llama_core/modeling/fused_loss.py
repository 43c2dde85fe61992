"""Cross entropy of the lm_head projection, computed in chunks of tokens: the ``[tokens, vocab]`` logits are
never materialised (``model(..., labels=labels, skip_logits=True)`` and the training loop use it).

Why: the plain loss builds the full logits and, for backward, their softmax: for a 128k vocabulary at 8k
tokens that is 4 GB of fp32 logits, and as much again for the saved log-probabilities and their gradient.
Here each chunk of ``chunk_size`` tokens is projected, reduced to its loss and its logits' gradient, and
dropped; only a chunk's logits are alive at any time.

Which backward: the gradients of the hidden states and of the lm_head weight are computed in forward, chunk
by chunk, and handed out (scaled by the incoming gradient) in backward, as Liger-Kernel's fused linear cross
entropy does. Recomputing each chunk's logits in backward instead (as Apple's Cut Cross-Entropy does, in a
kernel) saves holding the two gradients between forward and backward, but costs a fourth ``[tokens, hidden]
x [hidden, vocab]`` matmul: 4/3 of the plain path's head FLOPs, while this way costs exactly the plain path's
three (logits, grad of hidden, grad of weight). Training always runs backward right after the loss, and the
weight gradient is allocated by the plain path's backward anyway, so holding it a little earlier costs no
extra peak. Gradients are only computed for the inputs that need them (none when grad mode is off: an
evaluation loss costs one matmul per chunk).

Numerics follow the plain path (``causal_lm_loss``): each chunk's logits come from a matmul in the
activations' dtype (bf16 logits under bf16 weights or autocast, as the plain lm_head gives them) and are
upcast to fp32 for the log-softmax; the per-token gradient is cast back to that dtype before the two
gradient matmuls, as autograd casts the plain path's. The weight gradient is accumulated over chunks in fp32
and rounded once. In fp32 the loss and gradients match the plain path to rounding (~1e-7 relative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..quant import Int8Linear

IGNORE_INDEX = -100
# Fewest tokens per chunk. Every chunk adds a rank-``chunk`` update to the whole [vocab, hidden] weight
# gradient, so a thin chunk is bound by reading and writing that gradient, not by its FLOPs: measured on a
# 2-core EPYC at 512 tokens, vocab 32000, hidden 256, chunks of 8 tokens made loss + backward 14x slower than
# the plain path. At 256 the update does ~64 FLOPs per byte of fp32 gradient, matmul-bound on CPUs and GPUs.
MIN_CHUNK = 256


def default_chunk_size(tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk so that one chunk's logits hold about as many elements as the hidden states do
    (``chunk x vocab ~ tokens x hidden``; Liger's heuristic), so they cost no more than activations the model
    keeps anyway; but at least MIN_CHUNK tokens (see there) and at most ``tokens``. A power of two."""
    per_chunk = math.ceil(tokens / max(1, math.ceil(vocab / hidden)))
    return min(tokens, max(MIN_CHUNK, 1 << max(0, per_chunk - 1).bit_length()))


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                               num_items_in_batch: Tensor | int | None = None,
                               chunk_size: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` without the full logits.

    ``hidden [..., h]``, ``weight [vocab, h]``, ``targets [...]`` (already aligned with ``hidden``: no shift
    here), ``ignore_index`` positions skipped. The mean over non-ignored targets (NaN when every target is
    ignored, as ``F.cross_entropy`` gives), or the sum divided by ``num_items_in_batch`` when given
    (transformers' name; 1 gives the sum). Under autocast the matmuls run in the autocast dtype, as the
    plain ``lm_head`` call does.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"fused cross entropy: targets have shape {tuple(targets.shape)}, hidden states "
                         f"{tuple(hidden.shape)}: expected targets of shape {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused cross entropy: weight of shape {tuple(weight.shape)} does not project hidden "
                         f"size {hidden.shape[-1]} (expected [vocab, {hidden.shape[-1]}])")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused cross entropy: chunk_size must be at least 1, got {chunk_size}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    _check_targets(targets, weight.shape[0], ignore_index)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # Cast here, outside the Function, so autograd carries the gradients back to the fp32 leaves exactly
        # as it does through autocast's own casts in the plain lm_head call.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"fused cross entropy: hidden states are {hidden.dtype} but the lm_head weight is "
                        f"{weight.dtype}; cast the model to one dtype or run under torch.autocast")
    n = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], weight.shape[1])
    with torch.autocast(device, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, num_items_in_batch, chunk)


def _check_targets(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Fail with the offending value rather than an index error (or a CUDA assert) deep inside a chunk."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        value = int(targets[bad][0])
        raise ValueError(f"fused cross entropy: target id {value} is outside the vocabulary [0, {vocab}) and is "
                         f"not ignore_index {ignore_index}")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """hidden ``[n, h]``, weight ``[v, h]``, targets ``[n]`` -> scalar fp32 loss; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                num_items_in_batch: Tensor | int | None, chunk: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)  # any in-range id; its loss and gradient are masked out
        count = valid.sum()
        divisor = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=hidden.device)
        # d(loss)/d(per-token loss): 1/divisor for trained tokens, 0 for ignored ones. With nothing trained
        # the gradient is zero (as F.cross_entropy's), not 0 * inf.
        weight_of = valid.float() / (count.clamp(min=1) if num_items_in_batch is None else divisor).float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, rows = hidden[start:start + chunk], slice(start, start + chunk)
            logits = F.linear(h, weight).float()  # [c, v]: the only vocabulary-sized tensors alive
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            target_logit = logits.gather(1, safe[rows, None]).squeeze(1)
            total += torch.where(valid[rows], lse - target_logit, 0.0).sum()
            if not (need_hidden or need_weight):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(grad.shape[0], device=grad.device), safe[rows]] -= 1
            grad = grad.mul_(weight_of[rows, None]).to(h.dtype)  # [c, v], the dtype autograd would cast to
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[rows])
            if need_weight:
                if grad.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += grad.t() @ h  # low-precision product, accumulated in fp32
            # Free this chunk's [c, vocab] buffers before the next chunk's matmul allocates its own (measured:
            # otherwise two chunks are alive at once, 0.2 instead of ~0.1 of the plain logits at 4096 tokens).
            del logits, grad
        ctx.grads = (grad_hidden, grad_weight, hidden.dtype, weight.dtype)
        return total / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, hidden_dtype, weight_dtype = ctx.grads
        del ctx.grads  # a second backward through the same loss is an error, not a silent reuse
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_output).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def lm_head_loss(lm_head: nn.Module, hidden: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                 num_items_in_batch: Tensor | int | None = None, chunk_size: int | None = None) -> Tensor:
    """The fused loss of ``lm_head(hidden)`` against aligned ``targets``. The head is a plain linear layer, or
    a frozen weight-only int8 one (fine-tuning adapters on an int8 checkpoint), read as the weight its own
    forward multiplies by: dequantised to the activations' dtype."""
    weight = _head_weight(lm_head, hidden.dtype)
    return fused_linear_cross_entropy(hidden.to(weight.device), weight, targets, ignore_index, num_items_in_batch,
                                      chunk_size)


def _head_weight(lm_head: nn.Module, dtype: torch.dtype) -> Tensor:
    if getattr(lm_head, "bias", None) is not None:
        raise TypeError("skip_logits=True (the chunked loss) supports an lm_head without bias, as Llama's; "
                        "pass skip_logits=False for this model")
    if isinstance(lm_head, nn.Linear):
        return lm_head.weight
    if isinstance(lm_head, Int8Linear) and lm_head.mode == "int8-weight-only":
        return lm_head.dequantized_weight(dtype)
    mode = getattr(lm_head, "mode", None)
    raise TypeError(f"skip_logits=True (the chunked loss) needs lm_head to be an nn.Linear or a weight-only int8 "
                    f"layer; this model's lm_head is {type(lm_head).__name__}{f' ({mode})' if mode else ''}: pass "
                    f"skip_logits=False to compute the loss from the full logits")
