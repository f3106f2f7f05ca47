"""The memory's threshold, calibrated: how often an unrelated message gets an item prepended, how often a
related one misses its item, and the threshold that trades the two.

    store      the distinct memory items of a pairs CSV (default: the bundled test pairs, 20 items, 10 keys)
    related    its distinct messages; the right items for a message are those with true score 1.0
    unrelated  bundled messages whose keys appear in no stored item (data/memory_unrelated_combs.txt, 40 lines)

    false prepend(t) = share of unrelated messages whose best item has cos >= t (something is prepended)
    miss(t)          = share of related messages that do not get a right item prepended (best cos < t, or the
                       best item has another key)
    threshold        = the lowest t with false prepend(t) <= max_false (10 %): misses only grow with t, so this
                       minimises them under the bound; rounded up to 4 decimals

Messages are encoded as queries and items as passages, as the memory store does. `sbert.train` saves the result
in the model folder (ohlora_memory.json: {"threshold": t, "calibration": {...}}); chat.memory reads it back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd

from data.memory_pairs import read_combinations

ORIGINAL_THRESHOLD = 0.6
MAX_FALSE = 0.10


class Encoder(Protocol):
    """Ours (bert.model.SentenceEncoder) or a sentence-transformers model: what evaluation and calibration use."""

    def encode(self, texts: Sequence[str], batch_size: int = 32, convert_to_numpy: bool = True) -> Any: ...


@dataclass
class CalibrationSet:
    items: list[str]          # stored memory items (passages)
    related: list[str]        # messages with a right item in the store (queries)
    right: np.ndarray         # (R, N) bool: item n is a right memory for related message r
    unrelated: list[str]      # messages whose keys appear in no stored item


def encode_role(model: Encoder, texts: list[str], role: str, batch_size: int = 32) -> np.ndarray:
    """Eval-mode embeddings (N, H) float64 of `texts` as `role` ("query" = a user message, "passage" = a memory
    item): with the model's stored prompt for it when it has one (ours or a SentenceTransformer, both take
    `prompt_name`), else none. The caller's train/eval mode is restored afterwards."""
    prompts = getattr(model, "prompts", None) or {}
    kwargs = {"prompt_name": role} if prompts.get(role) else {}
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        import torch
        with torch.inference_mode():
            out = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, **kwargs)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return np.asarray(out, dtype=np.float64)


def bundled_unrelated() -> Path:
    import data
    return Path(data.__file__).resolve().parent / "memory_unrelated_combs.txt"


def calibration_set(pairs: pd.DataFrame, unrelated: str | Path | None = None) -> CalibrationSet:
    """Store, related and unrelated messages from a pairs frame and an unrelated-messages combination file."""
    items = list(dict.fromkeys(pairs["memory_0"]))
    related = list(dict.fromkeys(pairs["user_prompt_1"]))
    exact = pairs[pairs["similarity_score"] >= 1.0 - 1e-9]
    item_idx, msg_idx = {t: i for i, t in enumerate(items)}, {t: i for i, t in enumerate(related)}
    right = np.zeros((len(related), len(items)), dtype=bool)
    right[[msg_idx[m] for m in exact["user_prompt_1"]], [item_idx[t] for t in exact["memory_0"]]] = True
    keep = right.any(axis=1)  # a message without any right item is not "related"
    lines = read_combinations(unrelated or bundled_unrelated())
    return CalibrationSet(items, [m for m, k in zip(related, keep) if k], right[keep],
                          list(dict.fromkeys(line.message for line in lines)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def best_items(model: Any, cs: CalibrationSet, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Best cosine per message and whether the best item is a right one."""
    items = _unit(encode_role(model, cs.items, "passage", batch_size))                    # (N, H)
    rel = _unit(encode_role(model, cs.related, "query", batch_size)) @ items.T           # (R, N)
    unrel = _unit(encode_role(model, cs.unrelated, "query", batch_size)) @ items.T       # (U, N)
    best = rel.argmax(axis=1)
    return {"related": rel.max(axis=1), "related_right": cs.right[np.arange(len(best)), best],
            "unrelated": unrel.max(axis=1)}


def rates(best: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """false prepend and miss rates (and the wrong-item share of related messages) at `threshold`."""
    prepended = best["related"] >= threshold
    return {"false_prepend": float(np.mean(best["unrelated"] >= threshold)),
            "miss": float(np.mean(~(prepended & best["related_right"]))),
            "wrong_item": float(np.mean(prepended & ~best["related_right"]))}


def pick_threshold(unrelated_best: np.ndarray, max_false: float = MAX_FALSE) -> float:
    """The lowest threshold (4 decimals) at which at most `max_false` of the unrelated messages pass."""
    s = np.sort(np.asarray(unrelated_best, dtype=np.float64))[::-1]     # best first
    allowed = int(math.floor(max_false * len(s) + 1e-9))               # how many may pass
    if allowed >= len(s):
        return -1.0
    t = math.floor(s[allowed] * 1e4) / 1e4 + 1e-4                      # just above the first one that may not
    while t <= s[allowed]:
        t += 1e-4
    return round(min(t, 1.0), 4)


def calibrate(model: Any, pairs: pd.DataFrame, unrelated: str | Path | None = None, max_false: float = MAX_FALSE,
              batch_size: int = 32) -> dict[str, Any]:
    """{"threshold", "false_prepend", "miss", "wrong_item", counts, "at_0.6": rates at the original's 0.6}."""
    cs = calibration_set(pairs, unrelated)
    best = best_items(model, cs, batch_size)
    t = pick_threshold(best["unrelated"], max_false)
    return {"threshold": t, **rates(best, t), "max_false": max_false, "n_items": len(cs.items),
            "n_related": len(cs.related), "n_unrelated": len(cs.unrelated),
            f"at_{ORIGINAL_THRESHOLD}": rates(best, ORIGINAL_THRESHOLD)}


__all__ = ["CalibrationSet", "calibration_set", "bundled_unrelated", "encode_role", "best_items", "rates",
           "pick_threshold", "calibrate", "ORIGINAL_THRESHOLD", "MAX_FALSE"]
