"""save_pretrained: config.json + safetensors (sharded with an index above max_shard_size), atomically.

Everything is written into a temporary sibling directory which then replaces the target with renames,
so a crash leaves either the old checkpoint or the new one, never a mix. Files in an existing target
that are not ours (tokenizer, generation config, README) are carried over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loading import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE
from .placement import parse_size

logger = logging.getLogger(__name__)


def _is_weights_or_config(name: str) -> bool:
    return (name in ("config.json", SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)
            or (name.startswith("model-") and name.endswith(".safetensors"))
            or (name.startswith("pytorch_model-") and name.endswith(".bin")))


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors, contiguous; a tied lm_head is omitted (as transformers does)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device (never loaded): {', '.join(meta[:5])}")
    return {k: t.detach().contiguous() for k, t in state.items()}


def plan_shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    limit = parse_size(max_shard_size)
    target = Path(directory).expanduser().absolute()
    state = state_dict_for_saving(model)
    config = model.config.replace(dtype=str(model.dtype).removeprefix("torch."))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config.save_pretrained(tmp)
        shards = plan_shards(state, limit)
        if len(shards) == 1:
            save_file(shards[0], tmp / SAFE_SINGLE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a directory")
            for item in target.iterdir():  # keep what is not ours: tokenizer files, README, ...
                if not _is_weights_or_config(item.name) and not (tmp / item.name).exists():
                    _link_or_copy(item, tmp / item.name)
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (%d shard%s) to %s", type(model).__name__, len(shards), "s" * (len(shards) > 1), target)
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:
        os.link(src, dst)  # instant and no extra space; the old directory is deleted afterwards
    except OSError:
        shutil.copy2(src, dst)
