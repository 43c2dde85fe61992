"""The training loop: ``train(TrainConfig) -> TrainResult``, the same code on one device or under torchrun.

One optimizer step:
  1. this rank's micro-batches of the next global batch (data.PackedWindows);
  2. the number of trained targets in the whole global batch (one all-reduce of an int);
  3. per micro-batch: forward, summed token cross entropy scaled by dp_world / global_targets, backward
     (FSDP and DDP average gradients over ranks, so the sum over everything is the global token mean:
     any split of the batch over ranks and micro-batches gives the same gradient);
  4. clip the global gradient norm, AdamW step at the scheduled learning rate;
  5. log loss, tokens/s and MFU; checkpoint when due.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model_io.atomic import exclusive_directory
from ..tokenizer import Tokenizer
from .build import (
    QUANTIZE_BASE_SKIP,
    build_model,
    check_model_fits,
    compute_dtype,
    load_tokenizer,
    lora_config,
    make_optimizer,
    parallelize,
    uses_autocast,
)
from .chat_data import load_chat_stream, resolve_data_format
from .checkpoint import (
    check_same_shape,
    export_hf,
    export_lora,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from .config import TrainConfig
from .data import IGNORE_INDEX, Batch, PackedWindows, TokenStream, load_token_stream
from .distributed import Dist, all_reduce_sum, clip_grad_norm, init_distributed
from .metrics import mfu, peak_tflops
from .schedule import lr_at

logger = logging.getLogger(__name__)


@dataclass
class StepLog:
    step: int  # 0-based index of the optimizer step just taken
    loss: float  # mean token loss over the global batch
    lr: float
    grad_norm: float
    tokens_per_s: float  # all ranks together
    mfu: float | None
    seconds: float


@dataclass
class TrainResult:
    logs: list[StepLog] = field(default_factory=list)  # the steps run by this call (not those resumed past)
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    adapter_dir: Path | None = None  # LoRA runs: the adapter in PEFT's format

    @property
    def losses(self) -> list[float]:
        return [log.loss for log in self.logs]


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """``"auto"``: the newest complete checkpoint in output_dir, if any; otherwise the given directory."""
    if not cfg.resume:
        if list_checkpoints(Path(cfg.output_dir) / "checkpoints"):
            raise ValueError(f"{cfg.output_dir} already holds checkpoints of a run: pass --resume auto to continue "
                             f"it, or choose another --output-dir")
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(cfg.resume)
    read_trainer_state(path)  # a clear error for a path that is not a checkpoint
    return path


def load_stream(cfg: TrainConfig, tokenizer: Tokenizer) -> TokenStream:
    """The run's documents as one token stream: text files, or chat conversations trained on replies only."""
    if resolve_data_format(cfg.data, cfg.data_format) == "chat":
        if cfg.doc_separator is not None:
            raise ValueError(f"{cfg.data} is chat data (one conversation per JSONL line): doc_separator does not apply")
        return load_chat_stream(cfg.data, tokenizer)
    return load_token_stream(cfg.data, tokenizer, cfg.doc_separator)


def micro_step_loss(model: nn.Module, batch: Batch, fused: bool = True) -> torch.Tensor:
    """Summed next-token cross entropy (fp32) over the batch's trained targets.

    ``fused``: the model computes it in chunks of tokens without the full ``[tokens, vocab]`` logits
    (``skip_logits``; the same loss and gradients, a fraction of the memory); otherwise from the full logits.
    Through the model's forward either way, so FSDP's gathered lm_head weight is what the loss reads.
    ``num_items_in_batch=1`` asks for the plain sum: the loop scales it by the global target count itself.
    The restarting position ids alone tell the model the documents (no attention_mask, no cache), so it
    attends within them on its fused document-attention path.
    """
    if not fused:
        logits = model(batch.input_ids, position_ids=batch.position_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return model(batch.input_ids, position_ids=batch.position_ids, shift_labels=batch.targets,
                 num_items_in_batch=1, skip_logits=True).loss


def train(cfg: TrainConfig, on_step: Callable[[StepLog], None] | None = None) -> TrainResult:
    """Run (or resume) training as ``cfg`` says. ``on_step`` is called on every rank after each step.

    One run per output directory: the launching rank 0 holds its lock for the whole run, so a second run into
    the same directory fails at once (BusyError) instead of interleaving checkpoints, and a crashed run's
    partial checkpoint can be cleared by the next without asking whose it is."""
    cfg.check()
    rank = int(os.environ.get("RANK", "0"))  # before the process group exists: torchrun's launch rank
    with exclusive_directory(cfg.output_dir, "training run") if rank == 0 else contextlib.nullcontext():
        return _run(cfg, on_step)


def _run(cfg: TrainConfig, on_step: Callable[[StepLog], None] | None) -> TrainResult:
    d = init_distributed(cfg.device, cfg.parallel)
    accumulation = cfg.accumulation_steps(d.dp_world)  # before anything heavy: the batch must split evenly
    resume = resolve_resume(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    tokenizer = load_tokenizer(cfg)
    check_model_fits(model, cfg, tokenizer)
    if resume is not None:  # a shape mismatch is an error now, not after sharding
        check_same_shape(read_trainer_state(resume)["model_config"], model.config, resume)
    windows = PackedWindows(load_stream(cfg, tokenizer), cfg.seq_len, cfg.seed)

    dtype = compute_dtype(cfg.dtype, d.device)
    runner = parallelize(model, cfg, d, dtype)
    optimizer = make_optimizer(runner, cfg)
    step, consumed = 0, 0
    if resume is not None:
        state = load_checkpoint(resume, runner, optimizer, model.config, d, base_source=cfg.to_dict())
        step, consumed = state["step"], state["consumed_windows"]
        if state["train_config"]["seq_len"] != cfg.seq_len:
            logger.warning("seq_len changed from %d to %d: the data order continues, but not exactly",
                           state["train_config"]["seq_len"], cfg.seq_len)
    out_dir = Path(cfg.output_dir)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training %s of %s params on %d %s rank(s), mode %s, %s compute, %d x %d tokens per step "
                    "(accumulation %d), from step %d", f"{model.num_parameters(only_trainable=True):,}",
                    f"{model.num_parameters():,}", d.world, d.device.type,
                    d.mode, str(dtype).removeprefix("torch."), cfg.global_batch_size, cfg.seq_len, accumulation,
                    step)

    peak = peak_tflops(d.device, cfg.peak_tflops)
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    flops_per_step = model.floating_point_ops(tokens_per_step, seq_len=cfg.seq_len, training=True)
    autocast = uses_autocast(d, dtype)
    result = TrainResult()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (d.is_main and cfg.progress), unit="step",
               dynamic_ncols=True)
    metrics = (out_dir / "metrics.jsonl").open("a") if d.is_main else None
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                       min_lr_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = windows.step_batches(consumed, cfg.global_batch_size, cfg.micro_batch_size, d.dp_rank,
                                           d.dp_world, d.device)
            targets = all_reduce_sum(torch.tensor(sum(b.num_targets for b in batches), device=d.device), d)
            scale = d.dp_world / targets.clamp(min=1).item()
            loss_sum = torch.zeros((), device=d.device)
            for k, batch in enumerate(batches):
                # DDP: all-reduce gradients only after the last micro-batch
                sync = k == len(batches) - 1 or not hasattr(runner, "no_sync")
                with (contextlib.nullcontext() if sync else runner.no_sync(),
                      torch.autocast(d.device.type, dtype=dtype, enabled=autocast)):
                    loss = micro_step_loss(runner, batch, cfg.fused_loss)
                (loss * scale).backward()
                loss_sum += loss.detach()
            grad_norm = clip_grad_norm(runner.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            consumed += cfg.global_batch_size
            mean_loss = (all_reduce_sum(loss_sum, d) / targets.clamp(min=1)).item()  # also syncs the device
            seconds = time.perf_counter() - t0
            log = StepLog(step - 1, mean_loss, lr, grad_norm, tokens_per_step / seconds,
                          mfu(flops_per_step, seconds, d.world, peak), seconds)
            result.logs.append(log)
            _report(log, bar, metrics, cfg, windows.epoch_of(consumed))
            if on_step is not None:
                on_step(log)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                _save(out_dir, step, consumed, runner, optimizer, model, cfg, d)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    saved = list_checkpoints(out_dir / "checkpoints")
    done = next((p for p in saved if p.name == f"step_{step:08d}"), None)
    result.checkpoint = done or _save(out_dir, step, consumed, runner, optimizer, model, cfg, d)
    if cfg.export_hf and cfg.lora_rank:
        result.adapter_dir, result.hf_dir = export_lora(
            runner, model.config, lora_config(cfg), out_dir, d, cfg.quantize_base, QUANTIZE_BASE_SKIP,
            cfg.merge_lora, tokenizer=tokenizer)
    elif cfg.export_hf:
        # the tokenizer beside the exported weights, so the export is usable on its own
        result.hf_dir = export_hf(runner, model.config, out_dir / "hf", d, tokenizer=tokenizer)
    return result


def _save(out_dir: Path, step: int, consumed: int, runner: nn.Module, optimizer: torch.optim.Optimizer,
          model: nn.Module, cfg: TrainConfig, d: Dist) -> Path:
    state = {"step": step, "consumed_windows": consumed, "world_size": d.world,
             "model_config": model.config.to_dict(), "train_config": cfg.to_dict()}
    return save_checkpoint(out_dir / "checkpoints", step, runner, optimizer, state, d, cfg.keep_checkpoints)


def _report(log: StepLog, bar: tqdm, metrics, cfg: TrainConfig, epoch: float) -> None:
    if metrics is None:
        return
    row = {"step": log.step, "loss": log.loss, "lr": log.lr, "grad_norm": log.grad_norm,
           "tokens_per_s": log.tokens_per_s, "mfu": log.mfu, "epoch": epoch}
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    postfix = {"loss": f"{log.loss:.4f}", "lr": f"{log.lr:.2e}", "tok/s": f"{log.tokens_per_s:,.0f}"}
    if log.mfu is not None:
        postfix["mfu"] = f"{log.mfu:.1%}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
    if cfg.log_every and (log.step % cfg.log_every == 0 or log.step == cfg.max_steps - 1):
        logger.info("step %d  loss %.4f  lr %.2e  grad norm %.3f  %s tok/s%s  epoch %.2f", log.step, log.loss,
                    log.lr, log.grad_norm, f"{log.tokens_per_s:,.0f}",
                    f"  mfu {log.mfu:.1%}" if log.mfu is not None else "", epoch)
