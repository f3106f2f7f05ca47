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

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (prefix reuse: the next forward overwrites them in place)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length {length} outside [0, {self.length}]")
        self.length = length
