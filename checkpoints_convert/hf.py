"""Hugging Face checkpoints as a CheckpointSource, and writing any source out as one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llama_core.model_io.atomic import atomic_directory
from llama_core.model_io.hf_checkpoint import check_finite, open_hf_checkpoint
from llama_core.model_io.hub import resolve_checkpoint
from llama_core.model_io.placement import parse_size
from llama_core.model_io.safetensors_writer import write_sharded

from .source import CheckpointSource, TensorSpec

# Files copied next to converted weights when the input has them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def read_hf(directory: str | Path, dtype: torch.dtype | None = None) -> CheckpointSource:
    """An HF checkpoint directory, streamed shard by shard from memory maps, optionally cast."""
    config, infos, stream = open_hf_checkpoint(resolve_checkpoint(directory))
    floats = {i.dtype for i in infos.values() if i.dtype.is_floating_point}
    if len(floats) > 1 and dtype is None:
        raise ValueError(f"{directory} mixes dtypes {sorted(map(str, floats))}; pass --dtype to pick one")
    specs = {name: TensorSpec(info.shape, dtype or info.dtype) for name, info in infos.items()}

    def cast() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in stream():
            t = t if dtype is None else t.to(dtype)
            check_finite(name, t, directory)  # after the cast: a narrower dtype can overflow to inf
            yield name, t

    if dtype is not None:
        config = config.replace(dtype=str(dtype).removeprefix("torch."))
    return CheckpointSource(config, specs, cast, str(directory))


def with_tied_head(source: CheckpointSource, tie: bool) -> CheckpointSource:
    """Drop lm_head.weight and mark the embeddings tied (it must equal the embedding), or add an explicit
    copy of the embedding as lm_head.weight and mark them untied."""
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    config = source.config.replace(tie_word_embeddings=tie)
    if tie:
        specs = {k: v for k, v in source.specs.items() if k != head}
    else:
        if head in source.specs:
            raise ValueError(f"{source.description} already has an lm_head.weight; nothing to untie")
        specs = dict(source.specs) | {head: source.specs[emb]}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        embedding = dropped = None
        for name, t in source.stream():
            if name == emb:
                embedding = t  # memory-mapped when not cast: holding it costs no copy
            if name == head and tie:
                dropped = t
                continue
            yield name, t
        if embedding is None:
            raise ValueError(f"{source.description} has no {emb}")
        if tie and dropped is not None and not torch.equal(dropped, embedding):
            raise ValueError(f"cannot tie: {head} differs from {emb} in {source.description}")
        if not tie:
            yield head, embedding.clone()

    return CheckpointSource(config, specs, stream, source.description)


def write_hf(source: CheckpointSource, output: str | Path, max_shard_size: int | str = "5GB",
             copy_from: Path | None = None, extra_files: dict[str, Path] | None = None,
             progress: bool = True) -> Path:
    """config.json + safetensors shards, written atomically, one tensor in memory at a time; tokenizer
    files of ``copy_from`` and ``extra_files`` (name in the output -> source path) are copied in."""
    limit = parse_size(max_shard_size)
    specs = {name: (spec.shape, spec.dtype) for name, spec in source.specs.items()}
    with atomic_directory(output) as tmp, tqdm(total=source.total_bytes(), unit="B", unit_scale=True,
                                                desc="writing", disable=not progress or None) as bar:
        source.config.save_pretrained(tmp)
        write_sharded(tmp, specs, source.stream(), limit, progress=bar.update)
        copy_tokenizer_files(copy_from, tmp)
        for name, path in (extra_files or {}).items():
            shutil.copy2(path, tmp / name)
    return Path(output)


def copy_tokenizer_files(src: Path | None, dst: Path) -> None:
    if src is None or not src.is_dir():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
