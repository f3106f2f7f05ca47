"""The key/value cache every decoder family fills during incremental decoding."""
from __future__ import annotations

import math

import torch


class KVCache:
    """Keys/values of every layer for incremental decoding, filled in place by the model's forward.

    Layout per layer: (B, num_heads, capacity, head_dim); the first `length` positions are valid. Buffers are
    preallocated and grown in chunks of `chunk` positions, so a decode step writes one slot per layer instead of
    re-concatenating the whole history (cat would copy O(length) per step and allocate every step).
    """

    def __init__(self, num_layers: int, chunk: int = 256):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions already cached (advanced by the model after its last layer)
        self.chunk = chunk

    def __len__(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) after the cached positions; return all keys/values (B, nh, length+T, hd)."""
        start, end = self.length, self.length + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0] or buf_k.dtype != k.dtype:
            if buf_k is not None and buf_k.shape[0] != k.shape[0]:
                raise ValueError(f"KVCache holds batch size {buf_k.shape[0]}, got {k.shape[0]} new rows")
            capacity = math.ceil(end / self.chunk) * self.chunk
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = torch.empty_like(new_k)
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. drop finished sequences, or reorder for beam search)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, rows), v.index_select(0, rows)

    def pad_left(self, n: int) -> None:
        """Insert `n` empty positions before the cached ones in every row (continuous batching: rows join a batch
        whose cache is longer, left-padded; the caller masks the new positions out)."""
        if n <= 0:
            return
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is None:
                continue
            capacity = math.ceil((self.length + n) / self.chunk) * self.chunk
            new_k = k.new_zeros(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = torch.zeros_like(new_k)
            new_k[:, :, n:n + self.length] = k[:, :, :self.length]
            new_v[:, :, n:n + self.length] = v[:, :, :self.length]
            self.keys[i], self.values[i] = new_k, new_v
        self.length += n

    def trim_left(self, n: int) -> None:
        """Drop the first `n` positions of every row (columns that are padding in every row: a view, no copy)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KVCache.trim_left: {n} outside [0, {self.length}]")
        if n == 0:
            return
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, n:], v[:, :, n:]
        self.length -= n

    @classmethod
    def cat_rows(cls, caches: "list[KVCache]") -> "KVCache":
        """One cache holding the rows of `caches` in order (all of the same length: pad_left them first)."""
        lengths = {c.length for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"KVCache.cat_rows: caches of different lengths {sorted(lengths)}")
        length = lengths.pop()
        out = cls(len(caches[0].keys), caches[0].chunk)
        out.length = length
        for i in range(len(out.keys)):
            parts = [c.keys[i] for c in caches]
            if any(p is None for p in parts):
                continue
            out.keys[i] = torch.cat([c.keys[i][:, :, :length] for c in caches])
            out.values[i] = torch.cat([c.values[i][:, :, :length] for c in caches])
        return out

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (prefix reuse: the next forward overwrites them in place)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length {length} outside [0, {self.length}]")
        self.length = length
