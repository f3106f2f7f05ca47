"""Supervised fine-tuning data: Q&A CSV → prompt/answer token ids with the loss on the answer only.

Text layout (the original Oh-LoRA's, configurable through `PromptTemplate`):

    {input} (답변 시작) ### 답변: {output} (답변 종료)<EOS>
    └──────────── prompt ───────────┘└──────── answer ────────┘
    labels: -100 ... -100              ids of the answer + EOS

The prompt and the answer are tokenised *separately* and their ids concatenated, so the label boundary is
exact by construction. With a byte-level BPE whose pre-tokenizer splits before a space (GPT-2 style, as
Polyglot's), `... 답변:` + ` {output}` tokenises the same as the whole string, because `:` and ` word` are
always separate pre-tokens (checked in tests on the bundled data). EOS is appended as a token id, not as
text, so no tokenizer can split it.

Batches: length bucketing — shuffle, sort by length inside chunks of `chunk_batches × batch_size`, cut into
batches and shuffle the batch order — deterministic from (seed, epoch), so a resumed run sees the same order.
`collate` pads right; labels are -100 on pads.
"""
from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from core.errors import OhLoRAError
from core.jsonio import read_text

IGNORE_INDEX = -100
SPLIT_COLUMNS = ("split", "data_type")  # ours, then the original's
TRAIN_NAMES = {"train", "training"}
VALID_NAMES = {"valid", "validation", "val", "eval", "dev", "test"}


class SFTDataError(OhLoRAError):
    """Bad SFT data file: the message names the file and the problem (CLIs print it, exit 2)."""


class TokenizerLike(Protocol):
    eos_token_id: int
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


@dataclass
class PromptTemplate:
    """How a Q&A pair becomes text. Defaults: the original Oh-LoRA's format.

    `prompt(input)` is what the model sees at generation time; `answer_text(output)` follows it in training;
    EOS (an id) closes the answer when `add_eos`.
    """
    prompt_format: str = "{input} (답변 시작) ### 답변:"
    answer_format: str = " {output} (답변 종료)"
    add_eos: bool = True

    def prompt(self, input_text: str) -> str:
        return self.prompt_format.format(input=input_text)

    def answer_text(self, output_text: str) -> str:
        return self.answer_format.format(output=output_text)

    def full(self, input_text: str, output_text: str) -> str:
        """The training text without EOS (EOS is added as an id)."""
        return self.prompt(input_text) + self.answer_text(output_text)


@dataclass
class QAPair:
    input_text: str
    output_text: str | None  # None: a prompt only (sample generations, never in the loss)
    split: str = "train"     # "train" or "valid"


@dataclass
class SFTData:
    path: Path
    train: list[QAPair] = field(default_factory=list)   # with answers
    valid: list[QAPair] = field(default_factory=list)   # with answers → eval loss
    prompts: list[QAPair] = field(default_factory=list)  # without answers (any split) → sample generations
    n_skipped: int = 0                                   # rows without a question (nothing to train or ask)

    def sample_prompts(self, n: int) -> list[str]:
        """Inputs for sample generations: prompt-only rows first, then validation inputs."""
        pool = [p.input_text for p in self.prompts if p.split == "valid"] + \
               [p.input_text for p in self.valid] + [p.input_text for p in self.prompts if p.split != "valid"]
        return pool[:max(0, n)]


def _is_blank(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def load_sft_csv(path: str | os.PathLike, input_column: str = "input_data", output_column: str = "output_data",
                 split_column: str | None = None) -> SFTData:
    """Read a Q&A CSV. Split column: `split_column`, else `split` or `data_type` if present, else all train.

    Rows without an answer become prompts only. Errors (missing file/column, bad UTF-8, no rows) raise
    `SFTDataError` with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: SFT data file not found")
    text = read_text(path, SFTDataError, bom=True)
    if not text.strip():
        raise SFTDataError(f"{path}: the file is empty")
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except csv.Error as e:
        raise SFTDataError(f"{path}: malformed CSV ({e})") from None
    if split_column is None:
        split_column = next((c for c in SPLIT_COLUMNS if c in header), "")
    for col, flag in ((input_column, "--input-column"), (output_column, "--output-column"),
                      (split_column, "--split-column")):
        if col and col not in header:
            raise SFTDataError(f"{path}: no column {col!r} (columns: {', '.join(header)}); choose one with {flag}")
    data = SFTData(path=path)
    for line_no, row in enumerate(rows, start=2):
        inp, out = row.get(input_column), row.get(output_column)
        if _is_blank(inp):
            data.n_skipped += int(any(not _is_blank(v) for v in row.values()))  # blank lines are not rows
            continue  # rows without a question carry nothing
        split = "train"
        if split_column:
            raw = (row.get(split_column) or "").strip().lower()
            if raw in TRAIN_NAMES:
                split = "train"
            elif raw in VALID_NAMES:
                split = "valid"
            else:
                raise SFTDataError(f"{path}: line {line_no}: unknown {split_column} value {raw!r} "
                                   f"(use train or valid)")
        pair = QAPair(inp.strip(), None if _is_blank(out) else out.strip(), split)
        if pair.output_text is None:
            data.prompts.append(pair)
        elif split == "valid":
            data.valid.append(pair)
        else:
            data.train.append(pair)
    if not data.train:
        raise SFTDataError(f"{path}: no training rows with an answer (column {output_column!r})")
    return data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX over the prompt

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode_pair(tokenizer: TokenizerLike, template: PromptTemplate, input_text: str, output_text: str,
                max_length: int | None = None) -> tuple[Example, bool]:
    """Token ids and labels for one pair; returns (example, truncated).

    Truncation keeps the start (the prompt and any memory item at its head) and cuts the answer's tail.
    """
    prompt_ids = list(tokenizer.encode(template.prompt(input_text)))
    answer_ids = list(tokenizer.encode(template.answer_text(output_text)))
    if template.add_eos:
        answer_ids.append(int(tokenizer.eos_token_id))
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels), truncated


@dataclass
class EncodedSet:
    examples: list[Example]
    n_truncated: int = 0
    n_dropped: int = 0  # truncation left no answer token: nothing to learn from


def encode_pairs(tokenizer: TokenizerLike, template: PromptTemplate, pairs: Sequence[QAPair],
                 max_length: int | None = None) -> EncodedSet:
    out = EncodedSet([])
    for pair in pairs:
        assert pair.output_text is not None
        ex, truncated = encode_pair(tokenizer, template, pair.input_text, pair.output_text, max_length)
        out.n_truncated += int(truncated)
        if ex.n_label_tokens < 2:  # < 2: after the shift only one (or no) label would remain useful
            out.n_dropped += 1
            continue
        out.examples.append(ex)
    return out


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                            chunk_batches: int = 50, shuffle: bool = True) -> list[list[int]]:
    """Indices grouped into batches of similar length, deterministic from (seed, epoch).

    Shuffle all indices, sort by length inside chunks of `chunk_batches × batch_size`, cut into batches, then
    shuffle the batch order (so long and short batches are interleaved and the chunk sort leaks no order).
    `shuffle=False`: sorted by length, in order (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(f"sft-batches/{seed}/{epoch}")
    rng.shuffle(idx)
    chunk = max(batch_size, chunk_batches * batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids / attention_mask / labels (B, T), labels -100 on pads."""
    T = max(len(e) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """(real tokens, padded tokens incl. pads) over `batches`: how much padding the bucketing left."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return real, padded


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
