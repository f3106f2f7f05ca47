"""Server test helpers: a model that repeats the user's message (so answers, and the memory items in them, are
known in advance), a tiny tokenizer, and a real uvicorn server on a free loopback port in a thread."""
from __future__ import annotations

import contextlib
import threading
import time

import torch
from torch import nn

from core.tokenizer import Tokenizer
from data.sft import PromptTemplate
from tests.neox_fixtures import KOREAN_TEXTS, train_tiny_tokenizer

STOP = "(답변 종료)"


def echo_tokenizer(folder) -> Tokenizer:
    """Byte-level BPE trained on a little Korean: most syllables are 2-3 byte tokens, the marker 4+ tokens."""
    return Tokenizer.from_folder(train_tiny_tokenizer(folder, texts=KOREAN_TEXTS * 4))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class EchoLM(nn.Module):
    """Answers every prompt `{text} (답변 시작) ### 답변:` with ` {text} (답변 종료)` and then EOS, all probability
    on one token per step (greedy and sampling agree).

    It reads its whole history from the KV cache it is given (token ids stored as one layer's keys) and the
    attention mask, so it decodes correctly only if the caller keeps each row's cache, padding and mask right:
    a batch whose rows were mixed up answers with another row's text. `bytewise`: one token per UTF-8 byte
    (every Hangul syllable split over 3 tokens, the marker over 14). `delay`: seconds per forward (a model
    that is slow enough for requests to overlap)."""

    def __init__(self, tokenizer: Tokenizer, *, bytewise: bool = False, delay: float = 0.0,
                 template: PromptTemplate | None = None):
        super().__init__()
        self.tok, self.bytewise, self.delay = tokenizer, bytewise, delay
        self.template = template or PromptTemplate()
        self.tail = self.template.prompt("").strip()           # "(답변 시작) ### 답변:"
        self.vocab = tokenizer.vocab_size
        self.b2u = _bytes_to_unicode()
        self.forwards = 0

    def new_cache(self):
        from core.kv_cache import KVCache
        return KVCache(1)

    def encode_answer(self, text: str) -> list[int]:
        if not self.bytewise:
            return self.tok.encode(text)
        return [self.tok.tokenizer.token_to_id(self.b2u[b]) for b in text.encode("utf-8")]

    def next_token(self, history: list[int]) -> int:
        text = self.tok.decode(history)
        cut = text.find(self.tail)
        if cut < 0:
            return self.tok.eos_token_id
        prompt = text[:cut + len(self.tail)]
        message = prompt[:cut].strip()
        answer = self.encode_answer(f" {message} {STOP}")
        done = len(history) - len(self.tok.encode(prompt))
        return answer[done] if 0 <= done < len(answer) else self.tok.eos_token_id

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        B, T = input_ids.shape
        self.forwards += 1
        if self.delay:
            time.sleep(self.delay)
        if cache is not None:
            ids = input_ids[:, None, :, None].float()                       # (B, 1, T, 1): ids as "keys"
            keys, _ = cache.update(0, ids, ids)
            cache.length += T
            history = keys[:, 0, :, 0].long()                               # (B, past + T)
        else:
            history = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(history)
        logits = torch.zeros(B, T, self.vocab)
        for r in range(B):
            real = history[r][mask[r].bool()].tolist()
            logits[r, -1, self.next_token(real)] = 30.0
        return logits


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1"):
    """Serve `app` with uvicorn on a free port in a thread; yields the base URL; stops it afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_engine(model, tokenizer, *, max_queue: int = 64, max_batch: int = 8, max_prompt_tokens: int = 512):
    """The engine `python -m chat.serve` builds, around a test model."""
    from chat.serve.engine import BatchEngine
    return BatchEngine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens)
