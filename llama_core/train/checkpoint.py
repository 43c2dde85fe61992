"""Training checkpoints (sharded, through torch.distributed.checkpoint) and the final HF export.

A checkpoint is a directory ``checkpoints/step_00000100/`` holding the DCP shards of the model and the
optimizer (each rank writes its own part, any world size can read them back), ``rng/rank_NNNNN.pt``
(every rank's RNG states) and ``trainer_state.json`` (step, data position, model shape, run config).

Saving is crash-safe: everything is written under ``.step_N.tmp`` and renamed to ``step_N`` only after
every rank has finished, so a directory named ``step_N`` is always complete and the previous one is
untouched until then; leftover ``.tmp`` directories are ignored and cleared by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..modeling.config import LlamaConfig
from ..modeling.model import LlamaForCausalLM
from .distributed import Dist

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Config fields that decide parameter shapes: a checkpoint only resumes into a model that agrees on all.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (in-progress ``.tmp`` directories never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], d: Dist, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):  # a crashed earlier save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=d.world == 1)
    torch.save(rng_state(d.device), tmp / "rng" / f"rank_{d.rank:05d}.pt")
    _barrier(d)  # every rank's shards are on disk
    if d.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # re-saving a step (e.g. after resuming from it): swap, then drop the old copy
            old = root / f".step_{step:08d}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier(d)
    return final


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: no {STATE_FILE} in it")
    return json.loads(file.read_text())


def check_same_shape(saved: dict[str, Any], config: LlamaConfig, path: str | os.PathLike) -> None:
    """A clear error, before any tensor is read, when the checkpoint's model differs in shape."""
    ours = config.to_dict()
    theirs = LlamaConfig.from_dict(saved).to_dict()
    diff = [f"{k}: checkpoint {theirs.get(k)!r}, model {ours.get(k)!r}" for k in SHAPE_FIELDS
            if theirs.get(k) != ours.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {path}: it holds a model of a different shape ({'; '.join(diff)})")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: LlamaConfig, d: Dist) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG in place; returns the trainer state. Collective."""
    path = Path(path)
    state = read_trainer_state(path)
    check_same_shape(state["model_config"], config, path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=d.world == 1)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng_file = path / "rng" / f"rank_{d.rank:05d}.pt"
    if state.get("world_size") == d.world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True), d.device)
    else:  # weights and data position still resume exactly; only dropout/sampling noise differs
        logger.warning("%s was saved by %s ranks, resuming on %d: RNG states not restored", path,
                       state.get("world_size"), d.world)
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def export_hf(model: nn.Module, config: LlamaConfig, directory: str | os.PathLike, d: Dist) -> Path | None:
    """Gather the full weights on rank 0 and ``save_pretrained`` them (safetensors that transformers loads).

    Collective; returns the directory on rank 0, None elsewhere.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if d.is_main:
        with torch.device("meta"):
            plain = LlamaForCausalLM(config.replace(dtype=None), init=False)
        plain.load_state_dict(full, assign=True)
        plain.tie_weights()
        plain.model.rotary_emb.reset_buffers("cpu")
        out = plain.save_pretrained(directory)
    _barrier(d)
    return out
