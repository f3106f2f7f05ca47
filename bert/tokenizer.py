"""Sentence tokenizer on the `tokenizers` package: tokenizer.json, or a WordPiece / byte-level BPE from vocab files.

The truncation and padding settings stored inside a tokenizer.json (MiniLM's says "truncate at 128, pad to a
fixed 128") are overwritten on load: truncation is set to our `max_seq_length` (special tokens included, as
HF's `truncation=True, max_length=N`), and padding is off — batches are padded by `collate` to their own longest
row, so sorting by length avoids padding waste.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

from core.errors import OhLoRAError
from core.jsonio import read_json


class TokenizerLoadError(OhLoRAError):
    """A tokenizer that cannot be built from a folder: the message names the file and the problem."""


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json(path, TokenizerLoadError)


def _has_lowercase(normalizer: Any) -> bool:
    """The same test sentence-transformers applies before it adds a Lowercase for `do_lower_case`."""
    if normalizer is None:
        return False
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)
    return False


def _build_from_vocab(folder: Path, config: dict[str, Any], model_type: str) -> Tokenizer:
    """HF's fast-tokenizer conversion for a folder without tokenizer.json (vocab.txt, or vocab.json+merges.txt)."""
    special = lambda key, default: _token_str(config.get(key)) or default  # noqa: E731
    if (folder / "vocab.txt").is_file():
        unk, cls, sep = special("unk_token", "[UNK]"), special("cls_token", "[CLS]"), special("sep_token", "[SEP]")
        tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token=unk))
        lower = bool(config.get("do_lower_case", True))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=config.get("strip_accents"), lowercase=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        unk, cls, sep = special("unk_token", "<unk>"), special("cls_token", "<s>"), special("sep_token", "</s>")
        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()
    else:
        raise TokenizerLoadError(f"{folder}: no tokenizer.json, vocab.txt or vocab.json+merges.txt found")
    ids = {t: tok.token_to_id(t) for t in (cls, sep)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TokenizerLoadError(f"{folder}: special tokens {missing} are not in the vocabulary")
    if model_type == "roberta" and not (folder / "vocab.txt").is_file():
        tok.post_processor = processors.RobertaProcessing((sep, ids[sep]), (cls, ids[cls]))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=list(ids.items()))
    return tok


class SentenceTokenizer:
    """`tokenizers.Tokenizer` + truncation to `max_seq_length` + right padding to the batch's longest row."""

    def __init__(self, tokenizer: Tokenizer, pad_token_id: int, max_seq_length: int,
                 config: dict[str, Any] | None = None, return_token_type_ids: bool = True):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.config = dict(config or {})  # tokenizer_config.json, saved back with the model
        self.return_token_type_ids = return_token_type_ids
        self.tokenizer.no_padding()
        self.max_seq_length = max_seq_length

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if int(value) < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {value}")
        self._max_seq_length = int(value)
        self.tokenizer.enable_truncation(max_length=self._max_seq_length, strategy="longest_first",
                                         direction="right")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, model_type: str = "bert", max_seq_length: int = 512,
                    do_lower_case: bool = False, fallback_pad_id: int = 0) -> "SentenceTokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust error says what is wrong with the file
                raise TokenizerLoadError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
        else:
            tok = _build_from_vocab(folder, config, model_type)
        if do_lower_case and not _has_lowercase(tok.normalizer):
            # sentence_bert_config.json's do_lower_case: prepend Lowercase exactly as sentence-transformers does
            steps = [normalizers.Lowercase()]
            if isinstance(tok.normalizer, normalizers.Sequence):
                steps += list(tok.normalizer)
            elif tok.normalizer is not None:
                steps.append(tok.normalizer)
            tok.normalizer = normalizers.Sequence(steps)
        pad_token = _token_str(config.get("pad_token")) or (tok.padding or {}).get("pad_token")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        return cls(tok, fallback_pad_id if pad_id is None else pad_id, max_seq_length, config,
                   return_token_type_ids=model_type == "bert")

    def encode(self, texts: list[str]) -> list[Encoding]:
        """Token ids of each text, truncated, not padded."""
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=True)

    def collate(self, encodings: list[Encoding]) -> dict[str, Tensor]:
        """Right-pad to the longest row: input_ids, attention_mask (+ token_type_ids for BERT), all (B, T) int64."""
        T = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), T), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), T), dtype=np.int64)
        types = np.zeros((len(encodings), T), dtype=np.int64) if self.return_token_type_ids else None
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.type_ids
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            out["token_type_ids"] = torch.from_numpy(types)
        return out

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        return self.collate(self.encode(texts))

    def to_json_str(self) -> str:
        """tokenizer.json text without stored truncation/padding (HF and we set those per call)."""
        d = json.loads(self.tokenizer.to_str())
        d["truncation"], d["padding"] = None, None
        return json.dumps(d, ensure_ascii=False, indent=2)


__all__ = ["SentenceTokenizer", "TokenizerLoadError"]
