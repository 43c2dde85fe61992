"""KV caches: ``DynamicCache`` grows with each step; ``StaticCache`` is preallocated with fixed shapes.

Both store per layer ``keys/values [batch, kv_heads, length, head_dim]`` (the K/V heads, never repeated
for GQA) and the position ids of the cached tokens. ``update`` writes the new tokens at ``cache_position``
(their indices in the cache) and returns the layer's whole K/V for attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import LlamaConfig


class Cache:
    """Interface shared by the caches; the model only uses these methods."""

    keys: list[Tensor | None]
    values: list[Tensor | None]
    positions: Tensor | None

    def get_seq_length(self) -> int:
        """How many tokens are cached."""
        raise NotImplementedError

    @property
    def max_cache_len(self) -> int | None:
        """Fixed capacity, or None for a cache that grows."""
        return None

    def update(self, layer_idx: int, k: Tensor, v: Tensor, cache_position: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update_positions(self, position_ids: Tensor, cache_position: Tensor) -> Tensor:
        """Record the position ids ``[batch, seq]`` of the new tokens; return those of the whole cache."""
        raise NotImplementedError

    def reorder(self, index: Tensor) -> None:
        """Select batch rows in place (beam search): row i becomes old row ``index[i]``."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index.to(t.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))


class DynamicCache(Cache):
    """A cache that grows by concatenation; the default for ``use_cache=True``."""

    def __init__(self) -> None:
        self.keys = []
        self.values = []
        self.positions = None

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[-2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor, cache_position: Tensor) -> tuple[Tensor, Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        elif layer_idx < len(self.keys):
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=-2)
        else:
            raise IndexError(f"layer {layer_idx} updated before layer {len(self.keys)}")
        return self.keys[layer_idx], self.values[layer_idx]

    def update_positions(self, position_ids: Tensor, cache_position: Tensor) -> Tensor:
        if self.positions is None:
            self.positions = position_ids
        else:
            self.positions = torch.cat([self.positions, position_ids.to(self.positions.device)], dim=-1)
        return self.positions

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (e.g. to roll back rejected speculative tokens)."""
        self.keys = [t[..., :length, :] for t in self.keys]
        self.values = [t[..., :length, :] for t in self.values]
        if self.positions is not None:
            self.positions = self.positions[:, :length]


class StaticCache(Cache):
    """A preallocated cache of ``max_cache_len`` slots: fixed shapes, so compiled graphs and CUDA graphs
    can be reused across decode steps (gpt-fast style). Unused slots are masked out by the model.

    Buffers are allocated now when ``device`` is given, else on the first update on the keys' device
    (which also places each layer's buffer next to its layer when a model is split across devices).
    """

    def __init__(self, config: LlamaConfig, max_batch_size: int, max_cache_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if max_batch_size <= 0 or max_cache_len <= 0:
            raise ValueError(f"max_batch_size and max_cache_len must be positive, got {max_batch_size}, {max_cache_len}")
        self.max_batch_size = max_batch_size
        self._max_cache_len = max_cache_len
        self.dtype = dtype
        self._shape = (max_batch_size, config.num_key_value_heads, max_cache_len, config.head_dim)
        n = config.num_hidden_layers
        self.keys = [None] * n
        self.values = [None] * n
        self.positions = None
        # Cached length as a 0-d tensor beside the buffers, updated in place: a python int would be baked
        # into compiled graphs as a constant and force a recompile at every decode step.
        self._length: Tensor | None = None
        if device is not None:
            for i in range(n):
                self._allocate(i, torch.device(device), dtype or torch.get_default_dtype())

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def get_seq_length(self) -> int:
        """Tokens cached so far (reads a device scalar: a sync; compiled decode loops pass cache_position)."""
        return 0 if self._length is None else int(self._length)

    def _allocate(self, layer_idx: int, device: torch.device, dtype: torch.dtype) -> None:
        self.keys[layer_idx] = torch.zeros(self._shape, dtype=dtype, device=device)
        self.values[layer_idx] = torch.zeros(self._shape, dtype=dtype, device=device)
        if self._length is None:
            self._length = torch.zeros((), dtype=torch.long, device=device)
        if not torch.compiler.is_compiling():
            # Tell torch.compile the buffers keep their address across calls (needed for CUDA graphs).
            torch._dynamo.mark_static_address(self.keys[layer_idx])
            torch._dynamo.mark_static_address(self.values[layer_idx])
            torch._dynamo.mark_static_address(self._length)

    def check_room(self, batch_size: int, new_tokens: int, cached: int) -> None:
        """Raise before any write if a forward of this size does not fit."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds StaticCache max_batch_size {self.max_batch_size}")
        if cached + new_tokens > self._max_cache_len:
            raise ValueError(
                f"StaticCache is full: {cached} cached + {new_tokens} new tokens > max_cache_len "
                f"{self._max_cache_len}"
            )

    def update(self, layer_idx: int, k: Tensor, v: Tensor, cache_position: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, k.device, self.dtype or k.dtype)
        batch = k.shape[0]
        k_buf, v_buf = self.keys[layer_idx][:batch], self.values[layer_idx][:batch]
        k_buf.index_copy_(2, cache_position, k.to(k_buf.dtype))
        v_buf.index_copy_(2, cache_position, v.to(v_buf.dtype))
        if layer_idx == 0:
            self._length.copy_(cache_position[-1] + 1)
        if k_buf.dtype != k.dtype:  # a cache stored in another dtype hands K/V back in the model's
            return k_buf.to(k.dtype), v_buf.to(v.dtype)
        return k_buf, v_buf

    def update_positions(self, position_ids: Tensor, cache_position: Tensor) -> Tensor:
        if self.positions is None:
            self.positions = torch.zeros(self._shape[0], self._max_cache_len, dtype=torch.long,
                                         device=position_ids.device)
        rows = self.positions[: position_ids.shape[0]]
        rows.index_copy_(1, cache_position, position_ids.to(rows.dtype))
        return rows

    def reorder(self, index: Tensor) -> None:
        """Select batch rows in place (beam search), keeping the buffers' addresses: compiled graphs and
        CUDA graphs point at them. Rows past ``len(index)`` are left as they are."""
        for t in (*self.keys, *self.values, self.positions):
            if t is not None:
                rows = t[: index.shape[0]]
                rows.copy_(rows.index_select(0, index.to(t.device)))

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens, in place: later writes overwrite the slots after
        them, and until then the causal mask hides those slots (it is built from the cache positions)."""
        if not 0 <= length <= self._max_cache_len:
            raise ValueError(f"cannot crop a StaticCache of {self._max_cache_len} slots to {length} tokens")
        if self._length is not None:
            self._length.fill_(length)

    def reset(self) -> None:
        """Empty the cache in place, keeping the buffers (and so any compiled graph) for reuse."""
        for t in (*self.keys, *self.values):
            if t is not None:
                t.zero_()
        if self.positions is not None:
            self.positions.zero_()
        if self._length is not None:
            self._length.zero_()
