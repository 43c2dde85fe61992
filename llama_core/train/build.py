"""Building the pieces of a run: model (preset, config.json or checkpoint), tokenizer, optimizer,
and the model's distributed wrapping. Each is checked against the others before training starts."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..lora import LoraConfig, add_lora
from ..modeling.config import LlamaConfig
from ..modeling.model import LlamaForCausalLM
from ..quant import quantize
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .distributed import Dist, ddp_model, device_mesh, fully_shard_model, tensor_parallel

logger = logging.getLogger(__name__)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on GPUs that support it, else fp32 (bf16 autocast on CPUs is slower than fp32)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def build_model(cfg: TrainConfig) -> LlamaForCausalLM:
    """An fp32 model on the CPU (master weights stay fp32; bf16 is a compute dtype only). Call after seeding:
    every rank must build identical initial weights before they are sharded."""
    overrides = dict(cfg.config_overrides, kernels=cfg.kernels, attn_implementation=cfg.attn_implementation)
    if cfg.init_from:
        model = LlamaForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, **overrides)
    else:
        config = (LlamaConfig.from_preset(cfg.preset, **overrides) if cfg.preset
                  else LlamaConfig.from_json_file(cfg.model_config).replace(**overrides))
        model = LlamaForCausalLM(config)
    if cfg.lora_rank:
        add_training_lora(model, cfg)
    return model.train()


def lora_config(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=tuple(cfg.lora_targets), use_rslora=cfg.use_rslora,
                      base_model_name_or_path=cfg.init_from or cfg.model_config or cfg.preset)


# lm_head stays in full precision under an int8 base: the fused loss reads its weight directly, and its logits
# are the most quantisation-sensitive product (QLoRA keeps it unquantised too).
QUANTIZE_BASE_SKIP = ("lm_head",)


def add_training_lora(model: LlamaForCausalLM, cfg: TrainConfig) -> None:
    """Quantise the base if asked, then wrap the targeted linears in adapters; everything else is frozen.
    The adapters' random init comes from the same seeded generator on every rank."""
    if cfg.quantize_base:
        quantize(model, cfg.quantize_base, skip=QUANTIZE_BASE_SKIP)
    config = lora_config(cfg)
    names = add_lora(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %d linears (%s): %s trainable of %s parameters%s", cfg.lora_rank, len(names),
                ",".join(config.target_modules), f"{trainable:,}",
                f"{sum(p.numel() for p in model.parameters()):,}",
                f", base in {cfg.quantize_base}" if cfg.quantize_base else "")


def check_model_fits(model: LlamaForCausalLM, cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    c = model.config
    if cfg.seq_len > c.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} is above the model's context of {c.max_position_embeddings} "
                         f"tokens (max_position_embeddings)")
    if tokenizer.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {c.vocab_size}; "
                         f"use a matching tokenizer or set the model's vocab_size (--set vocab_size=N)")


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    return Tokenizer.from_pretrained(cfg.tokenizer or cfg.init_from)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed, as in GPT-3/Llama)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def parallelize(model: LlamaForCausalLM, cfg: TrainConfig, d: Dist, dtype: torch.dtype) -> nn.Module:
    """Move to the device, then (in this order, as torchtitan) tensor-parallel, compile, FSDP or DDP.

    Returns the module to call; ``model`` itself stays usable for its methods (floating_point_ops, config).
    """
    model.to(d.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    mesh = device_mesh(d) if d.mode in ("fsdp", "tp") else None
    if d.mode == "tp":
        tensor_parallel(model, mesh)
    if cfg.compile:
        for layer in model.model.layers:  # per block: small graphs, compiled once, reused by every layer
            layer.compile()
    if d.mode == "fsdp":
        return fully_shard_model(model, mesh, param_dtype=None if dtype == torch.float32 else dtype)
    if d.mode == "ddp":
        return ddp_model(model, d)
    return model


def uses_autocast(d: Dist, dtype: torch.dtype) -> bool:
    """FSDP casts parameters itself (its mixed-precision policy); everything else autocasts."""
    return dtype != torch.float32 and d.mode != "fsdp"
