"""S-BERT memory: a hand-written BERT/RoBERTa sentence encoder (sentence-transformers folder format) and the
chatbot's `[key: value]` memory store. Imports nothing from gptneox/, lora/ or train/.

Names are resolved lazily (PEP 562) so `python -m sbert.memory` does not import its own module twice.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderConfig": "sbert.encoder", "BertEncoder": "sbert.encoder", "EncoderLoadError": "sbert.encoder",
    "load_encoder": "sbert.encoder",
    "SentenceEncoder": "sbert.model", "SentenceModelError": "sbert.model",
    "MemoryStore": "sbert.memory", "extract_memory_items": "sbert.memory", "strip_memory_items": "sbert.memory",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sbert' has no attribute {name!r}")
