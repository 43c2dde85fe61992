"""One sequence fed to the model across calls with its KV cache kept: what an interactive chat needs. Each
turn hands over the whole conversation's token ids; the session keeps the cache for the longest prefix it
shares with what was fed before and feeds only the rest, then one token at a time.

With ``compile=True`` the cache is a :class:`StaticCache` sized in buckets of :data:`CACHE_BUCKET` slots and
each one-token step runs through the same compiled step as ``generate(compile=True)``; a conversation that
outgrows its bucket gets the next size (fed again from the start, and compiled once more for that shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..modeling.cache import DynamicCache, StaticCache
from .decode_loop import _compiled_decode_step, _decode_step, run_step

# A static cache is sized up to a multiple of this, so sequences of similar length share one compiled graph
# (and inductor's on-disk cache): a compiled step is specialised to its cache's shape, and attention reads
# every slot of it, so one cache of the model's whole context would make short conversations slow.
CACHE_BUCKET = 512


def bucketed_length(needed: int, max_positions: int) -> int:
    """Slots for a static cache that must hold ``needed`` tokens: the next multiple of :data:`CACHE_BUCKET`,
    but no more than the model's positions (unless ``needed`` itself is more)."""
    return min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, max(max_positions, needed))


class Session:
    """Feeds one sequence (batch 1) of ``model`` across calls; logits come back as fp32 ``[vocab]`` copies."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        self.model = model
        self.compile = compile
        self.cache: DynamicCache | StaticCache = DynamicCache()
        self.fed: list[int] = []  # the token ids whose keys and values are in the cache, in order
        self._guarded = False

    def feed(self, ids: list[int], room: int = 0) -> Tensor:
        """Make the cache hold ``ids`` (reusing the longest prefix already fed, feeding at least one token)
        and return the logits after the last one. ``room``: tokens that will be pushed after these, so a
        static cache is sized for them now."""
        if not ids:
            raise ValueError("feed needs at least one token id")
        if self.compile:
            self._make_room(len(ids) + room)
        keep = _common_prefix(self.fed, ids, limit=len(ids) - 1)
        self.cache.crop(keep)
        new = torch.tensor([ids[keep:]], device=self.model.device)
        positions = torch.arange(keep, len(ids), device=self.model.device)
        with torch.inference_mode():
            logits = self.model(new, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                                cache_position=positions if self.compile else None).logits[0, -1]
        self.fed = list(ids)
        return logits.float().clone()

    def push(self, token: int) -> Tensor:
        """Feed one more token and return the logits after it."""
        if not self.fed:
            raise ValueError("push follows a feed")
        device, n = self.model.device, len(self.fed)
        tokens = torch.tensor([[token]], device=device)
        step = _compiled_decode_step() if self.compile else _decode_step
        cache_position = torch.tensor([n], device=device) if self.compile else None
        with torch.inference_mode():
            logits = run_step(step, (self.model, self.cache, tokens, torch.tensor([[n]], device=device),
                                     cache_position, None), self.compile, skip_guards=self._guarded)
        self._guarded = self.compile  # same model, cache and shapes until the cache is replaced
        self.fed.append(token)
        return logits[0].float().clone()

    def _make_room(self, needed: int) -> None:
        """A static cache of at least ``needed`` slots; a new (bigger) one starts empty."""
        if isinstance(self.cache, StaticCache) and self.cache.max_cache_len >= needed:
            return
        length = bucketed_length(needed, self.model.config.max_position_embeddings)
        self.cache = StaticCache(self.model.config, max_batch_size=1, max_cache_len=length, dtype=self.model.dtype,
                                 device=self.model.device)
        self.fed, self._guarded = [], False


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(len(a), len(b), limit) and a[n] == b[n]:
        n += 1
    return n
