"""The batch-1 prefix cache `python -m chat` keeps between turns (infer.sampler.generate's `prefix_cache`).

A chat turn's prompt often starts with what the previous turn's prompt + answer held (a recalled memory item,
a retried prompt): the KV cache of those positions is kept, and the next prefill runs only on what follows the
longest shared token prefix (`core.kv_cache.KVCache.truncate` drops the rest).
"""
from __future__ import annotations

import torch

from core.kv_cache import KVCache


class PrefixCache:
    """A batch-1 KV cache kept between `generate` calls, with the token ids it holds.

    `take(model, ids)` returns (cache, n): the cache truncated to the longest prefix it shares with `ids` (at
    most len(ids) - 1 tokens, so the prefill yields the last position's logits), and n, the positions reused;
    `keep(ids)` records what the cache holds after a generation. Another model (or an interrupted call, which
    never reaches `keep`) starts from an empty cache. `reused` / `prefilled`: the last call's token counts."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.ids: list[int] = []
        self.model_id: int | None = None
        self.reused = self.prefilled = 0

    def take(self, model: torch.nn.Module, ids: list[int]) -> tuple[KVCache, int]:
        if self.cache is None or self.model_id != id(model):
            self.cache, self.ids, self.model_id = model.new_cache(), [], id(model)
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1, self.cache.length)
        self.cache.truncate(shared)
        self.ids = []                  # not valid until keep(): an interrupted generation leaves it empty
        self.reused, self.prefilled = shared, len(ids) - shared
        return self.cache, shared

    def keep(self, ids: list[int]) -> None:
        assert self.cache is not None and len(ids) == self.cache.length, (len(ids), self.cache)
        self.ids = ids
