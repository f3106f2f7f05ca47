"""Text generation with a KV cache: greedy / temperature / top-k / top-p / repetition penalty, EOS and stop strings.

One decoding loop serves every case:

    prefill:  logits = LM(prompt (B,T), mask (B,T), cache)[:, -1]            # fills the KV cache
    step t:   token (B,) = pick(process(logits (B,V)))                       # sampling ops on (B,V) only
              logits = LM(token (B,1), mask[:, :T+t+1] (a view), cache)[:, -1]

Prompts are left-padded so every row's last prompt token sits in the last column; positions are
`cumsum(mask) - 1` (as HF generate) and then advance by one per step. Each row stops on its own (EOS, a stop
string, or `max_new_tokens`); a finished row keeps riding along in the batch (its later tokens are thrown away)
until every row is done.

Stop strings are found on the *decoded text*, so a marker that the tokenizer splits over several tokens
(`(답변 종료)` is 4-6 byte-level BPE tokens) still stops generation and is cut. The check is O(new tokens) per
step, never a re-decode of the whole answer:

* `IncrementalDecoder` keeps two offsets into the row's token list (the vLLM / HF TextStreamer scheme):
  `prefix` .. `read` is the window already turned into text, `read` .. end the tokens not yet shown. Each
  step decodes only `ids[prefix:read]` and `ids[prefix:]` (a few tokens) and emits the difference. If that
  text ends in U+FFFD, the last token(s) hold only part of a UTF-8 character (a Korean syllable is 3 bytes and
  byte-level BPE may cut it, and a run of tokens can each end inside the next character), so nothing is
  emitted and the tokens wait for the rest. A genuinely invalid byte stops ending the text as soon as a
  complete character follows it, so the wait is short; `max_hold` (32 tokens) only bounds the window.
* The stop string is searched only in the tail `text[len_before - len(stop) + 1:]`, i.e. a window of
  len(stop) + len(new piece) characters.
* Streaming holds back the longest tail that could still become a stop string (and trailing whitespace, so the
  concatenated stream equals the returned, stripped answer exactly).

Batch-1 prefix reuse (`infer.prefix_cache.PrefixCache`, what `python -m chat` passes): the KV cache of the
previous call is kept with the ids it holds (that prompt + its answer but the last token); the next prompt
prefills only what follows the longest shared token prefix (`KVCache.truncate` drops the rest). Chat turns share
little (each turn's prompt is one templated message), but a retried empty answer re-prefills only its last prompt
token.

Processing order matches HF: repetition penalty, then temperature, top-k, top-p; greedy takes the argmax of
the penalised logits. Temperature 0 or `do_sample=False` means greedy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from core.causal_lm import CausalLM
from core.cli import COUNT, NONNEG, POSITIVE, check_config, flag
from infer.prefix_cache import PrefixCache

StreamFn = Callable[[int, str], None]
DecodeFn = Callable[[list[int]], str]


@dataclass
class SamplingConfig:
    """Decoding settings; `python -m chat` builds its flags from these fields (core.cli)."""
    max_new_tokens: int = flag(80, help="tokens generated per answer at most", range=COUNT)
    temperature: float = flag(0.6, help="softmax temperature (0 = greedy)", range=NONNEG)
    top_k: int = flag(0, help="sample from the k most likely tokens only (0 = off)", range=NONNEG)
    top_p: float = flag(1.0, help="nucleus sampling: smallest set with this much probability (1 = off)",
                        range="(0, 1]")
    repetition_penalty: float = flag(1.0, help="HF's: divide positive / multiply negative logits of tokens "
                                               "already present (1 = off)", range=POSITIVE)
    no_repeat_ngram_size: int = flag(3, help="never repeat an n-gram of the answer (0 = off; HF's rule, but over "
                                             "the answer only, so the prompt's memory item may be copied)",
                                     range=NONNEG)
    do_sample: bool = flag(True, help="sample (--no-do-sample or temperature 0: greedy)")
    stop_strings: tuple[str, ...] = flag(("(답변 종료)",), help="stop (and cut) at any of these strings")
    max_trials: int = flag(30, help="regenerate an empty answer up to this many times (sampling only)",
                           range=COUNT)
    seed: int | None = flag(None, help="sampling seed (default: random)")

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)
        check_config(self)  # the ranges above: finite, in range (ValueError naming the field)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


# ----------------------------------------------------------------------------------------------------------
# Logits processing on (B, V)
# ----------------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's CTRL-style penalty: for every token already in the row, logit/penalty if > 0 else logit*penalty.

    logits (B,V) float, seen (B,V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def banned_by_ngrams(ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `ids`: every token that followed an earlier occurrence of the last
    n-1 tokens (HF's no_repeat_ngram_size, on one row)."""
    if n <= 0 or len(ids) < n - 1:
        return []
    if n == 1:
        return list(set(ids))
    tail = ids[len(ids) - n + 1:]
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i:i + n - 1] == tail]


def apply_no_repeat_ngram(logits: torch.Tensor, new_ids: list[list[int]], n: int) -> torch.Tensor:
    """logits (B,V) with the tokens that would repeat an n-gram of row r's answer `new_ids[r]` set to -inf."""
    rows, cols = [], []
    for r, ids in enumerate(new_ids):
        banned = banned_by_ngrams(ids, n)
        rows += [r] * len(banned)
        cols += banned
    if not rows:
        return logits
    logits = logits.float().clone()
    logits[rows, cols] = float("-inf")
    return logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept, as HF), the rest -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                # (B,1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter as HF: drop the low tail whose total probability is <= 1-p (keeping at least 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)                   # ascending, (B,V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1.0 - p
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_next_tokens(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,V) logits -> (B,) token ids after penalty / temperature / top-k / top-p, greedy or sampled."""
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    logits = apply_top_k(logits, config.top_k)
    logits = apply_top_p(logits, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# Incremental detokenisation and stop strings
# ----------------------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Turns a growing token list into text pieces, decoding only a window of the last few tokens per step.

    `push(id)` returns the new text (possibly "" while a UTF-8 character is incomplete); `flush()` returns
    whatever is still held at the end. The concatenation of all pieces equals `decode(all ids)` for decoders
    that are prefix-stable (byte-level BPE is)."""

    def __init__(self, decode: DecodeFn, max_hold: int = 32):
        self.decode = decode
        self.max_hold = max_hold
        self.ids: list[int] = []
        self.prefix = 0     # start of the context window (already emitted text, for context-aware decoders)
        self.read = 0       # ids[:read] have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=len(self.ids) - self.read >= self.max_hold)

    def flush(self) -> str:
        """The held rest at the end of generation. A character the generation stopped inside (max_new_tokens
        hit between its bytes) is dropped rather than shown as U+FFFD."""
        return self._emit(final=True).rstrip("\ufffd") if self.read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.decode(self.ids[self.prefix:])
        if not final and text.endswith("\ufffd"):
            return ""                                   # part of a multi-byte character: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


def stop_prefix_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (0 if none)."""
    best = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class RowText:
    """Per-row text state: accumulated text, stop detection in a tail window, and hold-back for streaming.

    Every step touches only the tail: the stop search covers the last len(stop) - 1 old characters plus the
    new piece, and streaming looks at the characters not yet sent (new piece + what is held back)."""

    def __init__(self, decode: DecodeFn, stop_strings: Sequence[str], row: int, stream: StreamFn | None):
        self.decoder = IncrementalDecoder(decode)
        self.stop_strings = stop_strings
        self.max_stop = max((len(s) for s in stop_strings), default=0)
        self.row = row
        self.stream = stream
        self.text = ""
        self.sent = 0          # text[:sent] is streamed (or skipped leading whitespace)
        self.started = False   # a visible character has been streamed
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add one token; returns True when a stop string completed (the text is then cut before it)."""
        self._add(self.decoder.push(token_id))
        return self.stopped

    def finish(self) -> str:
        """End of generation: flush held tokens, cut, strip, stream the remainder; return the answer."""
        if not self.stopped:
            self._add(self.decoder.flush())
        answer = self.text.strip()
        if self.stream is not None:
            lead = len(self.text) - len(self.text.lstrip())
            already = self.sent - lead if self.started else 0
            if len(answer) > already:
                self.stream(self.row, answer[already:])
        return answer

    def _add(self, piece: str) -> None:
        if not piece or self.stopped:
            return
        start = max(0, len(self.text) - self.max_stop + 1)        # tail window: len(stop) - 1 + len(piece)
        self.text += piece
        cuts = [c for c in (self.text.find(stop, start) for stop in self.stop_strings) if c >= 0]
        if cuts:
            self.text = self.text[:min(cuts)]                      # the earliest stop string wins
            self.stopped = True
            return
        if self.stream is None:
            return
        text, lo = self.text, self.sent
        end = len(text) - stop_prefix_len(text[-self.max_stop:] if self.max_stop else "", self.stop_strings)
        while end > lo and text[end - 1].isspace():               # trailing whitespace waits for a next word
            end -= 1
        if not self.started:                                       # the answer is stripped: skip leading space
            while lo < end and text[lo].isspace():
                lo += 1
            self.sent = lo
        if end > lo:
            self.stream(self.row, text[lo:end])
            self.sent, self.started = end, True


# ----------------------------------------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------------------------------------

@dataclass
class GenerationOutput:
    token_ids: list[list[int]]                      # new tokens per row (no EOS, none after a stop string)
    texts: list[str] = field(default_factory=list)  # answers, stop string and after removed, stripped
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop" | "length"


def last_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, cache) -> torch.Tensor:
    """(B,V) logits of the last position. A model following the causal-LM contract (core/causal_lm.py) runs
    its LM head on that position only; any other module returning (B,T,V) logits works too (scripted tests)."""
    if isinstance(model, CausalLM):
        hidden = model.hidden_states(input_ids, attention_mask, position_ids, cache)  # (B,T,H)
        return model.logits(hidden[:, -1, :])                                         # (B,V)
    return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)[:, -1, :]


def make_generator(config: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   config: SamplingConfig | None = None, *, eos_token_id: int | None = None,
                   pad_token_id: int = 0, decode: DecodeFn | None = None, stream: StreamFn | None = None,
                   use_cache: bool = True, generator: torch.Generator | None = None,
                   prefix_cache: PrefixCache | None = None) -> GenerationOutput:
    """Generate for a left-padded batch. Stop strings and texts need `decode` (ids -> str); without it the
    loop works on ids only (EOS and max_new_tokens). `use_cache=False` recomputes the full forward every step
    (the reference the KV cache is checked against; slow). `prefix_cache` (batch 1, no padding): reuse the
    previous call's cache for the shared token prefix, and keep this call's for the next."""
    config = config or SamplingConfig()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be (batch, length>0), got {tuple(input_ids.shape)}")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generate: prompts must be left-padded (the last column of attention_mask must be 1)")
    if generator is None:
        generator = make_generator(config, device)
    stop_strings = config.stop_strings if decode is not None else ()
    rows = [RowText(decode, stop_strings, r, stream) for r in range(batch)] if decode is not None else None

    new_ids: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    done = [False] * batch
    max_new = config.max_new_tokens

    # Full mask for prompt + every new token, sliced (a view) each step; all-ones masks are dropped entirely.
    full_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, max_new).long()], dim=1)
    padded = bool((attention_mask == 0).any())
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)          # (B,T)
    next_pos = positions[:, -1:] + 1                                          # (B,1)
    seen = None                                     # (B,V) bool, tokens in each row (repetition penalty)

    reuse = prefix_cache is not None and use_cache and batch == 1 and not padded
    prompt_ids = input_ids[0].tolist() if reuse else []
    fed: list[int] = []                                                       # decode tokens fed to the cache
    skip = 0                                                                  # prompt positions already cached
    if reuse:
        cache, skip = prefix_cache.take(model, prompt_ids)
    else:
        cache = model.new_cache() if use_cache else None
    sequence = input_ids                                                      # only used without a cache
    if max_new > 0:
        mask = full_mask[:, :prompt_len] if padded else None
        logits = last_logits(model, input_ids[:, skip:], mask, positions[:, skip:], cache)   # (B,V)
    for step in range(max_new):
        if config.repetition_penalty != 1.0 and seen is None:
            vocab = logits.shape[-1]
            seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            real = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])   # pads -> a real token
            seen.scatter_(1, real.clamp(0, vocab - 1), True)
        if config.no_repeat_ngram_size:
            logits = apply_no_repeat_ngram(logits, new_ids, config.no_repeat_ngram_size)
        tokens = pick_next_tokens(logits, config, seen, generator)            # (B,)
        token_list = tokens.tolist()
        for r, tok in enumerate(token_list):
            if done[r]:
                continue
            if eos_token_id is not None and tok == eos_token_id:
                done[r], reasons[r] = True, "eos"
                continue
            new_ids[r].append(tok)
            if rows is not None and rows[r].push(tok):
                done[r], reasons[r] = True, "stop"
        if all(done) or step == max_new - 1:
            break
        # Finished rows feed a pad token; their outputs are ignored from here on.
        if any(done):
            tokens = tokens.masked_fill(torch.tensor(done, device=device), pad_token_id)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        step_ids = tokens[:, None]                                            # (B,1)
        total = prompt_len + step + 1
        if use_cache:
            logits = last_logits(model, step_ids, full_mask[:, :total] if padded else None, next_pos, cache)
            if reuse:
                fed.append(token_list[0])
        else:
            sequence = torch.cat([sequence, step_ids], dim=1)                 # (B,total)
            pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, step + 2, device=device)], dim=1)
            logits = last_logits(model, sequence, full_mask[:, :total] if padded else None, pos, None)
        next_pos = next_pos + 1

    if reuse:
        prefix_cache.keep((prompt_ids if max_new > 0 else prompt_ids[:skip]) + fed)
    texts = [row.finish() for row in rows] if rows is not None else []
    return GenerationOutput(new_ids, texts, reasons)


def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: SamplingConfig | None = None, **kwargs) -> list[list[int]]:
    """The new token ids per row (see `generate_batch` for the keyword arguments)."""
    return generate_batch(model, input_ids, attention_mask, config, **kwargs).token_ids


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], config: SamplingConfig | None = None,
             stream: StreamFn | None = None, prefix_cache: PrefixCache | None = None) -> list[str]:
    """Answers for `prompts` (a list of already templated prompt strings), stop string cut, stripped.

    A row whose answer comes out empty is generated again (fresh sampling) up to `config.max_trials` times in
    all; greedy decoding is deterministic, so it gets a single trial. `stream(row, piece)` receives the text
    as it is produced; the pieces of a row concatenate to exactly its returned answer. `prefix_cache`: see
    `PrefixCache` (used for single-prompt calls)."""
    return generate_detailed(model, tokenizer, prompts, config, stream, prefix_cache).texts


def generate_detailed(model: torch.nn.Module, tokenizer, prompts: list[str], config: SamplingConfig | None = None,
                      stream: StreamFn | None = None, prefix_cache: PrefixCache | None = None) -> GenerationOutput:
    """`generate` with each answer's token ids and finish reason ("eos" | "stop" | "length") of its last trial."""
    config = config or SamplingConfig()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        return GenerationOutput(token_ids=[])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = make_generator(config, device)
    was_training = model.training
    model.eval()                                    # no dropout while generating (restored afterwards)
    try:
        return _generate_with_retries(model, tokenizer, prompts, config, stream, device, generator, prefix_cache)
    finally:
        model.train(was_training)


def _generate_with_retries(model, tokenizer, prompts: list[str], config: SamplingConfig, stream: StreamFn | None,
                           device: torch.device, generator: torch.Generator | None,
                           prefix_cache: PrefixCache | None = None) -> GenerationOutput:
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    answers, ids, reasons = [""] * len(prompts), [[] for _ in prompts], ["length"] * len(prompts)
    todo = list(range(len(prompts)))
    trials = 1 if config.greedy else config.max_trials
    for _ in range(trials):
        input_ids, attention_mask = tokenizer.batch_encode([prompts[i] for i in todo], padding_side="left")
        row_stream = None
        if stream is not None:
            index = list(todo)
            row_stream = lambda r, piece: stream(index[r], piece)  # noqa: E731  (map sub-batch rows back)
        out = generate_batch(model, input_ids.to(device), attention_mask.to(device), config, eos_token_id=eos,
                             pad_token_id=pad, decode=decode, stream=row_stream, generator=generator,
                             prefix_cache=prefix_cache if len(todo) == 1 else None)
        for k, i in enumerate(todo):
            answers[i], ids[i], reasons[i] = out.texts[k], out.token_ids[k], out.finish_reasons[k]
        todo = [i for i in todo if not answers[i]]
        if not todo:
            break
    return GenerationOutput(token_ids=ids, texts=answers, finish_reasons=reasons)
