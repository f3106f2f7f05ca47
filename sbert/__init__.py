"""S-BERT: a hand-written BERT/RoBERTa/XLM-R sentence encoder (sentence-transformers folder format), its siamese
training (`python -m sbert.train`, on train/'s loop and helpers) and evaluation. The memory store that uses it
is the app layer's (chat/memory.py).

Names are resolved lazily (PEP 562) so `python -m sbert.train` does not import its own module twice.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderConfig": "sbert.encoder", "BertEncoder": "sbert.encoder", "EncoderLoadError": "sbert.encoder",
    "load_encoder": "sbert.encoder",
    "SentenceEncoder": "sbert.model", "SentenceModelError": "sbert.model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sbert' has no attribute {name!r}")
