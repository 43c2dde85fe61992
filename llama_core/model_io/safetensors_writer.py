"""Writing safetensors files one tensor at a time, sharded as Hugging Face does.

``safetensors.torch.save_file`` needs every tensor of a file in memory and copies each into a bytes object
first, so a shard costs twice its size. The format is simple (an 8-byte little-endian header length, a
JSON header of dtype/shape/byte offsets, then the raw bytes), so we write the header from the planned
shapes and then stream each tensor's bytes as it is produced: one tensor in memory at a time.
Files are read back with the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .atomic import no_space_names
from .dtypes import SAFETENSORS_DTYPES


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def write_safetensors(path: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (yielded in ``specs`` order, each matching its spec) to one safetensors file."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store {name} of dtype {dtype} in safetensors")
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with no_space_names(path):  # a bare write error names no file
        _write_file(path, raw, specs, tensors)


def _write_file(path: str | os.PathLike, raw: bytes, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    expected = iter(specs.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, tensor in tensors:
            want_name, (shape, dtype) = next(expected, (None, (None, None)))
            if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the planned "
                                 f"{want_name} {shape} {dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().data if data.numel() else b"")
        missing = [name for name, _ in expected]
        if missing:
            raise ValueError(f"stream ended before these tensors were written: {', '.join(missing[:5])}")


def plan_shards(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[str]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sharded(directory: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  tensors: Iterator[tuple[str, torch.Tensor]], max_shard_size: int,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """HF layout: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index."""
    shards = plan_shards(specs, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    stream = iter(tensors)
    for shard, file in zip(shards, names, strict=True):
        shard_specs = {n: specs[n] for n in shard}

        def take(count: int = len(shard)):
            for _ in range(count):
                item = next(stream, None)
                if item is None:
                    return
                yield item
                if progress:
                    progress(item[1].numel() * item[1].element_size())

        write_safetensors(directory / file, shard_specs, take())
    extra = next(stream, None)  # also runs the source to its end, where sources make final checks
    if extra is not None:
        raise ValueError(f"the tensor stream has more tensors than planned, starting with {extra[0]}")
    if len(shards) > 1:
        weight_map = {n: file for shard, file in zip(shards, names, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(_nbytes(*s) for s in specs.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
