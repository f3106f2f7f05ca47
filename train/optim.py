"""Optimizer and learning-rate schedule shared by every trainer (SFT and S-BERT).

One place decides how we build AdamW and its warmup + decay schedule, so both trainers behave alike.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def build_adamw(params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]], lr: float,
                weight_decay: float = 0.0, no_decay: Sequence[str] = (),
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused (one kernel for all tensors) where torch offers it.

    `params`: parameters, or (name, parameter) pairs; a parameter whose name contains one of `no_decay`
    (e.g. "bias", "LayerNorm.weight", as sentence-transformers' fit) gets weight decay 0 in a second group.
    torch's fused AdamW runs on CUDA and CPU for float32/bf16/fp16 parameters; anything else falls back to
    the multi-tensor ("foreach") path, which gives the same numbers.
    """
    named = [item if isinstance(item, tuple) else ("", item) for item in params]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("build_adamw: no trainable parameters (did you freeze everything?)")
    exempt = [bool(no_decay) and any(k in n for k in no_decay) for n, _ in named]
    groups = [{"params": [p for (_, p), e in zip(named, exempt) if not e]},
              {"params": [p for (_, p), e in zip(named, exempt) if e], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused_ok = all(p.device.type in ("cuda", "cpu") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                   for _, p in named)
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError):  # an older torch, or a device without a fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str = "cosine") -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warmup from ~0 to 1 over `warmup_steps`, then `decay` to 0 at `total_steps`:
    "cosine" (0.5·(1+cos(π·progress))), "linear" (1-progress) or "constant" (1).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr decay {decay!r}: use cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; its state_dict (the step count) is all a resume needs."""
    lr_factor(0, total_steps, warmup_steps, decay)  # validate `decay` now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, decay))
