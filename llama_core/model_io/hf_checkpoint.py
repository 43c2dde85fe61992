"""A Hugging Face checkpoint directory: its weight files, every tensor's header, and a one-pass stream.

Safetensors headers are read without touching tensor data, so the loader can check every name, shape and
dtype before a single weight is read. ``.bin`` checkpoints go only through the weights-only unpickler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..modeling.config import LlamaConfig
from .dtypes import safetensors_dtype

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"

# One pass over a checkpoint's tensors as (HF name, tensor), in file order.
TensorStream = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) of the checkpoint in ``directory``."""
    for kind, index, single in (("safetensors", SAFE_INDEX, SAFE_SINGLE), ("bin", BIN_INDEX, BIN_SINGLE)):
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{directory / index} is not a valid index (needs a 'weight_map'): {e}") from e
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{directory / index} lists shards that do not exist: {', '.join(missing)}")
            return kind, files
        if (directory / single).is_file():
            return kind, [directory / single]
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def _safetensors_headers(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(file, framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                out[name] = TensorInfo(file, tuple(sl.get_shape()), safetensors_dtype(sl.get_dtype(), f"{file}: tensor {name}"))
            return out
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle checkpoint, only ever through the weights-only unpickler."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise ValueError(f"{file} could not be loaded as a weights-only PyTorch checkpoint: {e}") from e


def read_headers(kind: str, files: list[Path]) -> tuple[dict[str, TensorInfo], dict[Path, dict]]:
    """Name -> (file, shape, dtype) for every tensor, without reading tensor data (safetensors)."""
    infos: dict[str, TensorInfo] = {}
    bins: dict[Path, dict] = {}
    for file in files:
        if kind == "safetensors":
            found = _safetensors_headers(file)
        else:
            bins[file] = _load_bin(file)
            found = {k: TensorInfo(file, tuple(t.shape), t.dtype) for k, t in bins[file].items()}
        for name, info in found.items():
            if name in infos:
                raise ValueError(f"tensor {name} appears in both {infos[name].file} and {file}")
            infos[name] = info
    return infos, bins


def open_hf_checkpoint(directory: Path) -> tuple[LlamaConfig, dict[str, TensorInfo], TensorStream]:
    """Config, tensor headers and a one-pass tensor stream of the HF checkpoint in ``directory``."""
    config = LlamaConfig.from_pretrained(directory)
    kind, files = _weight_files(directory)
    infos, bins = read_headers(kind, files)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:  # one shard at a time: its mapping is released before the next is opened
            if kind == "safetensors":
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        yield name, f.get_tensor(name)
            else:
                yield from bins.pop(file).items()

    return config, infos, stream
