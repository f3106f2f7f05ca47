"""Rotary position embedding tables and their application (the "rotate_half" layout HF uses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding (GPT-NeoX "rotate_half" style, not interleaved).

    No buffers: the fp32 table is built lazily on the device of the positions and grown on demand (to the next
    power of two ≥ 256 positions, not the config's maximum at once: Gemma-3's 32k × 256 tables would take 128 MB for
    a 128-token fine-tune), so a model built on the meta device needs no buffer fix-up, and HF's numerics are
    kept (fp32 angles, cast to the activation dtype as HF does; a row does not depend on the table's length).

    `linear_scaling` > 1 is HF's "linear" rope scaling (positions divided by the factor, done as HF does it:
    the inverse frequencies divided by it), used by Gemma 3's global layers.
    """

    def __init__(self, dim: int, base: float, linear_scaling: float = 1.0):
        super().__init__()
        self.dim, self.base = dim, float(base)
        self.linear_scaling = float(linear_scaling)
        self._cos: torch.Tensor | None = None  # (P, dim) fp32
        self._sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        if self.linear_scaling != 1.0:
            inv_freq = inv_freq / self.linear_scaling
        freqs = torch.arange(n, device=device).float()[:, None] * inv_freq  # (n, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, dim)
        self._cos, self._sin = emb.cos(), emb.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, 1, 1, dim) in `dtype` (broadcast over heads and q/k)."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 1
        if self._cos is None or self._cos.device != position_ids.device or self._cos.shape[0] < needed:
            self._build(max(256, 1 << (needed - 1).bit_length()), position_ids.device)
        cos = F.embedding(position_ids, self._cos).to(dtype)
        sin = F.embedding(position_ids, self._sin).to(dtype)
        return cos[:, :, None, None, :], sin[:, :, None, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over the two halves of x's last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
