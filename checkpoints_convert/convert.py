"""The conversions: Meta -> HF, HF -> Meta, llama2.c -> HF, HF -> HF (reshard / cast / tie), HF -> GGUF and
GGUF -> HF.

Every one streams from memory-mapped inputs, writes into a temporary directory that replaces the output
only when complete, refuses a non-empty output unless ``force``, and never writes inside its input.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llama_core.model_io.atomic import atomic_directory, no_space_names
from llama_core.model_io.dtypes import parse_dtype
from llama_core.model_io.placement import parse_size

from .gguf import read_gguf
from .gguf_write import write_gguf
from .hf import read_hf, with_tied_head, write_hf
from .llama2c import read_llama2c
from .meta import config_to_params, default_embedding_split, meta_shard_tensors, read_meta

logger = logging.getLogger(__name__)


def _check_paths(inputs: Path, output: Path, force: bool) -> None:
    inputs, output = inputs.expanduser().resolve(), output.expanduser().resolve()
    if not inputs.exists():
        raise FileNotFoundError(f"input not found: {inputs}")
    # Writing into the input, or replacing a directory that contains it, could destroy it.
    if output == inputs or inputs in output.parents or output in inputs.parents:
        raise ValueError(f"output {output} overlaps the input {inputs}; the input is never modified")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise FileExistsError(f"output {output} exists and is not empty; pass --force to replace it")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return None if dtype is None else parse_dtype(dtype)


def meta_to_hf(input_dir: str | Path, output_dir: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_size: int | str = "5GB", force: bool = False,
               max_position_embeddings: int | None = None, progress: bool = True) -> Path:
    """Merge model-parallel shards, permute q/k to rotate-half, write HF safetensors + config.json."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_paths(input_dir, output_dir, force)
    # Map inputs one output shard's worth at a time: resident memory ~ one output shard.
    source = read_meta(input_dir, _dtype(dtype), group_bytes=parse_size(max_shard_size),
                       max_position_embeddings=max_position_embeddings)
    return write_hf(source, output_dir, max_shard_size, copy_from=input_dir, progress=progress)


def hf_to_meta(input_dir: str | Path, output_dir: str | Path, num_shards: int = 1,
               dtype: str | torch.dtype | None = None, force: bool = False,
               embedding_split_dim: int | None = None, progress: bool = True) -> Path:
    """Split into ``num_shards`` model-parallel ranks in Meta's names and interleaved q/k layout."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_paths(input_dir, output_dir, force)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    source = read_hf(input_dir, _dtype(dtype))
    config = source.config
    for name, count in (("num_attention_heads", config.num_attention_heads),
                        ("num_key_value_heads", config.num_key_value_heads)):
        if count % num_shards:
            raise ValueError(f"{name} ({count}) is not divisible by {num_shards} shards")
    params = config_to_params(config)
    axis = default_embedding_split(config) if embedding_split_dim is None else embedding_split_dim
    if axis not in (0, 1):
        raise ValueError(f"embedding_split_dim must be 0 or 1, got {axis}")
    with atomic_directory(output_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for rank in tqdm(range(num_shards), desc="ranks", disable=not progress or None):
            # one pass over the input per rank keeps only that rank's slices in memory
            # through a Python file: torch.save to a path reports a full disk as "unexpected pos", losing errno
            file = tmp / f"consolidated.{rank:02d}.pth"
            with no_space_names(file), open(file, "wb") as f:
                torch.save(meta_shard_tensors(source, num_shards, rank, axis), f)
        if (input_dir / "tokenizer.model").is_file():
            shutil.copy2(input_dir / "tokenizer.model", tmp / "tokenizer.model")
    return output_dir


def llama2c_to_hf(input_file: str | Path, output_dir: str | Path, dtype: str | torch.dtype | None = None,
                  max_shard_size: int | str = "5GB", force: bool = False, tokenizer: str | Path | None = None,
                  progress: bool = True) -> Path:
    """A llama2.c ``.bin`` (v0 legacy, v1 fp32, v2 int8) as an HF checkpoint; ``tokenizer`` (a
    sentencepiece ``.model``) is copied in as tokenizer.model."""
    input_file, output_dir = Path(input_file), Path(output_dir)
    _check_paths(input_file, output_dir, force)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
    source = read_llama2c(input_file, _dtype(dtype))
    extra = {"tokenizer.model": Path(tokenizer)} if tokenizer is not None else None
    return write_hf(source, output_dir, max_shard_size, extra_files=extra, progress=progress)


def reshard(input_dir: str | Path, output_dir: str | Path, max_shard_size: int | str = "5GB",
            dtype: str | torch.dtype | None = None, tie_embeddings: bool | None = None, force: bool = False,
            progress: bool = True) -> Path:
    """HF -> HF: new shard size, optional cast, optionally drop (tie) or add (untie) lm_head.weight."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_paths(input_dir, output_dir, force)
    source = read_hf(input_dir, _dtype(dtype))
    if tie_embeddings is not None:
        source = with_tied_head(source, tie_embeddings)
    return write_hf(source, output_dir, max_shard_size, copy_from=input_dir, progress=progress)


def hf_to_gguf(input_dir: str | Path, output_file: str | Path, outtype: str = "f32", force: bool = False,
               tokenizer: str | Path | None = None, progress: bool = True) -> Path:
    """An HF checkpoint (with its tokenizer and chat template, or ``tokenizer``'s) as one GGUF file that
    llama.cpp runs; ``outtype`` f32, f16, bf16 or q8_0."""
    from llama_core.tokenizer import Tokenizer
    from llama_core.tokenizer.gguf_export import add_tokenizer_metadata

    input_dir, output_file = Path(input_dir), Path(output_file)
    _check_paths(input_dir, output_file, force)
    try:
        tok = Tokenizer.from_pretrained(tokenizer if tokenizer is not None else input_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; llama.cpp needs the vocabulary inside the GGUF: pass --tokenizer") from e
    source = read_hf(input_dir, torch.float32)  # exact for fp16/bf16 inputs; the output type rounds once

    def add_metadata(writer) -> None:
        writer.add_name(input_dir.resolve().name)
        add_tokenizer_metadata(writer, tok)

    return write_gguf(source, output_file, outtype, add_metadata=add_metadata, progress=progress)


def gguf_to_hf(input_file: str | Path, output_dir: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_size: int | str = "5GB", force: bool = False, progress: bool = True) -> Path:
    """A ``llama`` GGUF as an HF checkpoint, dequantised into ``dtype`` (default: the file's own float type,
    float32 for a quantised file), with its vocabulary and chat template as tokenizer.json and
    tokenizer_config.json."""
    from llama_core.tokenizer.gguf_vocab import save_hf_tokenizer_files

    input_file, output_dir = Path(input_file), Path(output_dir)
    _check_paths(input_file, output_dir, force)
    source = read_gguf(input_file, _dtype(dtype))
    with tempfile.TemporaryDirectory() as tok_dir:
        files = save_hf_tokenizer_files(input_file, Path(tok_dir))
        return write_hf(source, output_dir, max_shard_size, extra_files={f.name: f for f in files},
                        progress=progress)
