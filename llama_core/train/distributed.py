"""torch.distributed plumbing: process group, and the three ways to spread a model over ranks.

- FSDP2 (default under torchrun): ``fully_shard`` on every decoder layer, then on the root, so each
  layer's parameters are all-gathered just before use and freed after; mixed precision through
  ``MixedPrecisionPolicy`` (bf16 compute, fp32 master weights and gradient reduction).
- DDP: every rank holds the whole model; gradients are all-reduced.
- Tensor parallel: ``parallelize_module`` with Megatron's plan per layer: q/k/v and gate/up split by
  output features (colwise, each rank owns whole heads), o_proj and down_proj by input features
  (rowwise, one all-reduce per block). Embeddings, norms and lm_head stay replicated. Attention derives
  its local head count from the projection's output shape, so the model code is unchanged.

Data parallel size is the world size for FSDP and DDP and 1 for tensor parallel (every rank sees the
same batch).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.model import LlamaForCausalLM
from .config import PARALLEL_MODES

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Dist:
    """Where this process sits: global rank and world, and its data-parallel share."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return 0 if self.mode == "tp" else self.rank

    @property
    def dp_world(self) -> int:
        return 1 if self.mode == "tp" else self.world


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device: str = "auto", mode: str = "auto", timeout_s: float = 600) -> Dist:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {PARALLEL_MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        if mode in ("fsdp", "ddp", "tp"):
            logger.warning("--parallel %s with a single process: training on one device", mode)
        return Dist(device=dev, mode="none")
    if mode == "none":
        raise ValueError(f"--parallel none but WORLD_SIZE={world}: pick fsdp, ddp or tp (or run one process)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, "fsdp" if mode == "auto" else mode)


def device_mesh(d: Dist):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(d.device.type, (d.world,))


def check_tensor_parallel(model: LlamaForCausalLM, tp: int) -> None:
    c = model.config
    for name, n in (("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads),
                    ("intermediate_size", c.intermediate_size)):
        if n % tp:
            raise ValueError(f"tensor parallel over {tp} ranks needs {name} ({n}) divisible by {tp}")


def tensor_parallel(model: LlamaForCausalLM, mesh) -> LlamaForCausalLM:
    """Shard every decoder layer's attention and MLP over ``mesh`` (1-D) in place; for training or inference.

    The model must be on the mesh's device type already; inputs must be identical on every rank.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_tensor_parallel(model, mesh.size())
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def fully_shard_model(model: LlamaForCausalLM, mesh, param_dtype: torch.dtype | None) -> LlamaForCausalLM:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def ddp_model(model: nn.Module, d: Dist) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast: the model's buffers never change in training (RoPE frequencies, and a frozen int8
    # base's weights, which would otherwise be re-sent from rank 0 on every forward).
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over data-parallel ranks (a no-op without them)."""
    if d.dp_world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm in place and return the norm before clipping.

    Works for any mix of plain tensors and DTensors (FSDP shards, TP shards, replicated tensors):
    the squared norms of DTensor grads are reduced over their meshes by DTensor itself, so each
    element is counted exactly once.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if sharded:
        # Grouped per mesh/placement by torch itself; .full_tensor() of the 0-d result is one reduction.
        norm = torch.nn.utils.get_total_norm(sharded, 2.0)
        squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain, 2.0).float() ** 2
    total = float(squares.sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total
