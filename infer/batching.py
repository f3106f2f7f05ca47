"""Continuous batching: many generation requests share one model, each joining the running batch at the next step
and leaving when it is done (the scheduler behind `python -m chat.serve`).

    batcher = ContinuousBatcher(model, tokenizer, max_batch=8)
    batcher.add(BatchRequest(prompt_ids, config, on_piece=print))    # waits for a free row
    while batcher.busy:
        for request in batcher.step():                               # one decoding step for every active row
            request.text, request.finish_reason, request.token_ids

One step:

    1. leave:  rows that finished or were cancelled are dropped (KVCache.select); leading cache columns that are
               padding in every remaining row are cut (KVCache.trim_left)
    2. join:   waiting requests (up to the free rows) are prefilled together, left-padded, into a cache of their
               own; their first token is sampled from the prefill; that cache is left-padded (or the batch's is)
               to the same length and its rows appended (KVCache.pad_left, KVCache.cat_rows)
    3. decode: every row feeds its last token: input (B,1), mask (B, L+1), position ids (B,1) = the row's own
               next position (its real-token count), so a row's keys, positions and attention are what they would
               be alone; its logits go through its own sampling settings, generator, n-gram ban and repetition
               penalty, and its text through its own stop-string / UTF-8 handling (infer.sampler.RowText)

Every row is `[padding][its real tokens]` in the cache, real tokens contiguous, so distances (and Gemma's
sliding window, counted in cache columns) are the row's own. Greedy answers equal the request decoded alone
(tests/test_batching.py), up to float rounding of the padded shapes.

A request whose answer comes out empty is sampled again, as `generate` does (up to `max_trials`; greedy once).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.kv_cache import KVCache
from infer.sampler import (
    RowText,
    SamplingConfig,
    apply_no_repeat_ngram,
    last_logits,
    make_generator,
    pick_next_tokens,
)


@dataclass(eq=False)
class BatchRequest:
    """One request: its prompt, settings and streaming callback in; its answer out (once `done`)."""
    prompt_ids: list[int]
    config: SamplingConfig
    on_piece: Callable[[str], None] | None = None      # streamed text (the pieces concatenate to `text`)
    cancelled: Callable[[], bool] = lambda: False       # polled before each step: True -> the request leaves
    token_ids: list[int] = field(default_factory=list)  # new tokens (no EOS, none after a stop string)
    text: str = ""                                       # the answer: stop string and after cut, stripped
    finish_reason: str | None = None                     # "eos" | "stop" | "length" | "cancelled"
    trials: int = 0
    generator: torch.Generator | None = None            # the seeded generator, kept across retries
    id: int = field(default_factory=itertools.count(1).__next__)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Row:
    """A request's decoding state while it is in the batch."""

    def __init__(self, request: BatchRequest, decode, device: torch.device, vocab: int):
        self.request = request
        config = request.config
        if request.generator is None:
            request.generator = make_generator(config, device)
        self.generator = request.generator
        self.text = RowText(decode, config.stop_strings, 0,
                             (lambda _r, piece: request.on_piece(piece)) if request.on_piece else None)
        self.new_ids: list[int] = []
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt_ids, device=device).clamp(0, vocab - 1)] = True
        self.pending: int | None = None     # the sampled token the next decode step feeds
        self.next_pos = len(request.prompt_ids)
        self.reason: str | None = None

    def accept(self, token: int, eos: int | None) -> None:
        """Record a sampled token: EOS, a completed stop string or max_new_tokens end the row."""
        if eos is not None and token == eos:
            self.reason = "eos"
            return
        self.new_ids.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        if self.text.push(token):
            self.reason = "stop"
        elif len(self.new_ids) >= self.request.config.max_new_tokens:
            self.reason = "length"
        else:
            self.pending = token


def pick_rows(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """The next token of each row (logits (B, V), row i for rows[i]) under its own settings: the n-gram bans of
    all rows in one pass per n, greedy rows without a repetition penalty in one argmax, the others one by one
    (their temperature, top-k/p, penalty and generator). Equal to picking each row alone."""
    logits = logits.float()
    for n in {row.request.config.no_repeat_ngram_size for row in rows} - {0}:
        logits = apply_no_repeat_ngram(
            logits, [row.new_ids if row.request.config.no_repeat_ngram_size == n else [] for row in rows], n)
    tokens = [0] * len(rows)
    argmax_rows = [i for i, row in enumerate(rows) if row.request.config.greedy and row.seen is None]
    if argmax_rows:
        for i, token in zip(argmax_rows, logits[argmax_rows].argmax(dim=-1).tolist()):
            tokens[i] = token
    for i, row in enumerate(rows):
        if i not in argmax_rows:
            tokens[i] = int(pick_next_tokens(logits[i:i + 1], row.request.config, row.seen, row.generator)[0])
    return tokens


class ContinuousBatcher:
    """The batch: rows in the model's KV cache, a waiting list, `step()` to advance every row by one token."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.waiting: list[BatchRequest] = []
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None          # (B, L) long: 1 = a real position of that row
        self.steps = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows) - len(self.waiting)

    def add(self, request: BatchRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("BatchRequest: empty prompt")
        self.waiting.append(request)

    # ---- one step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[BatchRequest]:
        """Advance every row by one token (new rows: their prefill + one token); returns the requests that
        finished (or were cancelled) in this step."""
        finished = self._leave()
        for request in [r for r in self.waiting if r.cancelled()]:
            self.waiting.remove(request)
            request.finish_reason = "cancelled"
            finished.append(request)
        room = self.max_batch - len(self.rows)
        if self.waiting and room > 0:
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            self._join(joining)
        if any(row.pending is not None for row in self.rows):
            self._decode()
            self.steps += 1
        return finished + self._leave()

    def _leave(self) -> list[BatchRequest]:
        """Drop finished and cancelled rows from the batch (and their cache rows); returns their requests."""
        out, keep = [], []
        for i, row in enumerate(self.rows):
            if row.reason is None and row.request.cancelled():
                row.reason = "cancelled"
            if row.reason is None:
                keep.append(i)
                continue
            request = row.request
            if row.reason != "cancelled":
                request.text = row.text.finish()
            request.token_ids, request.trials = row.new_ids, request.trials + 1
            retry = (row.reason != "cancelled" and not request.text and not request.config.greedy
                     and request.trials < request.config.max_trials)
            if retry:                                   # an empty answer: sampled again, as `generate` does
                request.token_ids = []
                self.waiting.insert(0, request)
            else:
                request.finish_reason = row.reason
                out.append(request)
        if len(keep) == len(self.rows):
            return out
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return out
        index = torch.tensor(keep, device=self.device)
        self.cache.select(index)
        self.mask = self.mask.index_select(0, index)
        first_real = int(self.mask.any(dim=0).long().argmax())      # columns before it are padding in every row
        if first_real:
            self.cache.trim_left(first_real)
            self.mask = self.mask[:, first_real:]
        return out

    def _join(self, requests: list[BatchRequest]) -> None:
        """Prefill `requests` as one left-padded group, sample their first tokens, merge them into the batch."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_cache()
        logits = last_logits(self.model, ids, mask if padded else None, positions, cache)    # (G, V)
        rows = [_Row(r, self.decode, self.device, logits.shape[-1]) for r in requests]
        for row, token in zip(rows, pick_rows(rows, logits)):
            row.accept(token, self.eos)
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        batch_len, group_len = self.cache.length, cache.length
        if batch_len < group_len:
            self.cache.pad_left(group_len - batch_len)
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), group_len - batch_len), self.mask], dim=1)
        elif group_len < batch_len:
            cache.pad_left(batch_len - group_len)
            mask = torch.cat([mask.new_zeros(len(rows), batch_len - group_len), mask], dim=1)
        self.cache = KVCache.cat_rows([self.cache, cache])
        self.mask = torch.cat([self.mask, mask])
        self.rows += rows

    def _decode(self) -> None:
        """Feed every row's pending token; rows that ended at their first token sit this step out (they leave
        before the next one): their column is masked and their output ignored."""
        live = torch.tensor([row.pending is not None for row in self.rows], device=self.device)
        tokens = torch.tensor([[row.pending if row.pending is not None else self.pad] for row in self.rows],
                              device=self.device)                                            # (B, 1)
        positions = torch.tensor([[row.next_pos] for row in self.rows], device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, live.long()[:, None]], dim=1)                       # (B, L + 1)
        all_real = bool(self.mask.all())
        logits = last_logits(self.model, tokens, None if all_real else self.mask, positions, self.cache)
        fed = [i for i, row in enumerate(self.rows) if row.pending is not None]
        rows = [self.rows[i] for i in fed]
        for row, token in zip(rows, pick_rows(rows, logits[fed] if len(fed) < len(self.rows) else logits)):
            row.pending, row.next_pos = None, row.next_pos + 1
            row.accept(token, self.eos)
