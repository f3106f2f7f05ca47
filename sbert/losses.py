"""The siamese losses of sbert.train, chosen by name (`LOSSES`).

    u = f(passage: memory) (B, H), v = f(query: message) (B, H), both from one encoder
    cosine-mse  Σ_b (cos(u_b, v_b) − score_b)²         sentence-transformers' CosineSimilarityLoss (the original)
    mnr         batches of positive pairs (score 1.0); for message i the in-batch memories are the candidates:
                Σ_i −log softmax_j(s·cos(v_i, u_j))[i], s = 20, the other right memories (score 1.0) masked out
                (MultipleNegativesRankingLoss without its false negatives)
    mnr+mse     mnr + w · Σ_i mean_j (cos(v_i, u_j) − score_ij)²: every in-batch cell is a scored pair

A loss returns (summed loss, items counted); the Trainer divides the gradients by the items of the whole global,
accumulated batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_mse(u: Tensor, v: Tensor, scores: Tensor) -> tuple[Tensor, int]:
    """Σ_b (cos(u_b, v_b) − score_b)² and B: CosineSimilarityLoss as a sum (the Trainer divides by all B)."""
    cos = F.cosine_similarity(u, v, dim=-1)                               # (B,)
    return F.mse_loss(cos, scores.to(device=cos.device, dtype=cos.dtype), reduction="sum"), len(cos)


def in_batch_logits(u: Tensor, v: Tensor, scores: Tensor, scale: float) -> Tensor:
    """(B, B) logits s·cos(v_i, u_j) with the other right memories of message i (score 1.0, j ≠ i) masked."""
    cos = F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T                 # (B_msg, B_mem)
    eye = torch.eye(len(cos), dtype=torch.bool, device=cos.device)
    false_negative = (scores.to(cos.device) >= 1.0 - 1e-6) & ~eye
    return (scale * cos).masked_fill(false_negative, float("-inf"))


def mnr(u: Tensor, v: Tensor, scores: Tensor, scale: float = 20.0) -> tuple[Tensor, int]:
    """Σ_i −log softmax_j(s·cos(v_i, u_j))[i] over a batch of positive pairs (u_i, v_i) and B.

    scores: (B, B) key scores of memory j with message i (diagonal 1.0), for the false-negative mask."""
    logits = in_batch_logits(u, v, scores, scale)
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, target, reduction="sum"), len(logits)


def mnr_mse(u: Tensor, v: Tensor, scores: Tensor, scale: float = 20.0, mse_weight: float = 3.0) -> tuple[Tensor, int]:
    """mnr + mse_weight · Σ_i mean_j (cos(v_i, u_j) − score_ij)² (every in-batch cell is a scored pair) and B."""
    ranking, n = mnr(u, v, scores, scale)
    cos = F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T
    mse = F.mse_loss(cos, scores.to(device=cos.device, dtype=cos.dtype), reduction="sum") / cos.shape[1]
    return ranking + mse_weight * mse, n


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., tuple[Tensor, int]]
    in_batch: bool  # batches of positive pairs, scores = their (B, B) key-score matrix; else (B,) pair scores
    params: tuple[str, ...] = ()  # TrainConfig fields passed to fn as keywords


# name -> Loss: fn(u (B, H), v (B, H), scores) -> (summed loss, items counted); the Trainer divides the
# gradients by the items of the whole global, accumulated batch. A new loss: one function, one entry.
LOSSES = {"cosine-mse": Loss(cosine_mse, in_batch=False),
          "mnr": Loss(mnr, in_batch=True, params=("scale",)),
          "mnr+mse": Loss(mnr_mse, in_batch=True, params=("scale", "mse_weight"))}
