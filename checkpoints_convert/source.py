"""A checkpoint as the converters and the loader see it: a config, the HF name, shape and dtype of every
tensor, and a stream that yields the tensors (HF names, HF rotate-half layout) one at a time, in order.

Streaming is what bounds memory: a writer or the loader consumes each tensor and drops it before the next
is produced, and sources map their input files lazily and release them as they go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llama_core.modeling.config import LlamaConfig


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class CheckpointSource:
    config: LlamaConfig
    specs: dict[str, TensorSpec]  # HF name -> shape/dtype, in stream order
    stream: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # yields (name, tensor) in ``specs`` order
    description: str  # where it came from, for messages

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())
