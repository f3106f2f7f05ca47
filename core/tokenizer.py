"""The one tokenizer interface of every causal-LM family: a thin wrapper around `tokenizers.Tokenizer` with
HF's special-token files (encode / decode / batch_encode / eos_token_id / pad_token_id / check_fits).

It lives in core/ because the families build it (gemma/: from a GGUF's metadata) and everything above them
uses it (infer/ loads it for any HF folder, data/ encodes with its interface, train/ and chat/ through infer/).

Special tokens come from `tokenizer_config.json`, overridden by `special_tokens_map.json` as transformers does
(values may be a string or a dict with "content"); eos defaults to `<|endoftext|>` when the vocabulary has it, and pad defaults to eos.
Ids equal `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`'s for the same file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer as RawTokenizer

from core.errors import OhLoRAError
from core.jsonio import read_json

DEFAULT_EOS = "<|endoftext|>"


class TokenizerError(OhLoRAError):
    """A tokenizer folder we cannot use (the message names the file and the problem)."""


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return read_json(path, TokenizerError)


class Tokenizer:
    def __init__(self, tokenizer: RawTokenizer, eos_token: str | None = DEFAULT_EOS, pad_token: str | None = None,
                 bos_token: str | None = None, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        self.eos_token = eos_token
        self.eos_token_id = self._id(eos_token, "eos_token") if eos_token is not None else None
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.pad_token_id = self._id(self.pad_token, "pad_token") if self.pad_token is not None else None
        self.bos_token = bos_token
        self.bos_token_id = self._id(bos_token, "bos_token") if bos_token is not None else None

    def _id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {role} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"{path}: cannot read tokenizer: {e}") from None
        # HF's precedence: tokenizer_config.json, overridden by special_tokens_map.json unless the config is of
        # the newer kind (with "added_tokens_decoder"), in which case special_tokens_map.json is not read.
        sources = [_read_json(folder / "tokenizer_config.json")] if (folder / "tokenizer_config.json").is_file() else []
        if (folder / "special_tokens_map.json").is_file() and not (sources and "added_tokens_decoder" in sources[0]):
            sources.append(_read_json(folder / "special_tokens_map.json"))
        special: dict[str, str] = {}
        for d in sources:
            for role in ("eos_token", "pad_token", "bos_token"):
                content = _token_content(d.get(role))
                if content is not None:
                    special[role] = content
        eos = special.get("eos_token")
        if eos is None and raw.token_to_id(DEFAULT_EOS) is not None:
            eos = DEFAULT_EOS
        return cls(raw, eos_token=eos, pad_token=special.get("pad_token"), bos_token=special.get("bos_token"),
                   source=str(folder))

    def check_fits(self, vocab_size: int, config_path: str | os.PathLike) -> None:
        """Every id this tokenizer can produce must index the model's embedding table; checked once at load,
        else a foreign tokenizer ends in `IndexError: index out of range` mid-run (or trains on garbage)."""
        max_id = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        if max_id >= vocab_size:
            raise TokenizerError(f"{Path(self.source) / 'tokenizer.json'}: token ids go up to {max_id}, but "
                                 f"{config_path} has vocab_size {vocab_size}: tokenizer and model do not match")

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens (len(tokenizer) in HF)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return self.tokenizer.decode_batch([list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def batch_encode(self, texts: list[str], padding_side: str = "right", max_length: int | None = None,
                     add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to the longest (after truncating each to max_length, keeping its start).

        Returns input_ids (B, T) and attention_mask (B, T), both LongTensor; 1 marks real tokens."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if self.pad_token_id is None:
            raise TokenizerError(f"{self.source}: no pad (or eos) token to pad with")
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask
