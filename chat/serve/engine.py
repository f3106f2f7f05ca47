"""The engine behind the API: one model shared by every request, reached through `submit` and an async job.

    job = engine.submit(prompt, config)        # EngineBusy (-> 429) when the queue is full, EngineClosed (-> 503)
    async for event in job:                    # str pieces of the answer (stop strings cut, no split characters)
        ...                                    # then one Completion (text, finish reason, token counts)
    job.cancel()                               # the client went away: the engine drops the request at once

The model runs on the engine's own thread; a job carries its events to the asyncio loop of the request
(`loop.call_soon_threadsafe`). An engine implements `submit`, `close` and `stats`, and exposes `tokenizer`
and `max_prompt_tokens`; the app (chat/serve/app.py) does not care how requests share the model.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from core.errors import OhLoRAError
from train.sampler import SamplingConfig, generate_detailed


class EngineBusy(Exception):
    """Every slot and queue place is taken: try again shortly (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down or has failed (HTTP 503)."""


class Cancelled(Exception):
    """The job was cancelled (its client went away) before it completed."""


class PromptTooLong(OhLoRAError):
    """The templated prompt has more tokens than the server allows (HTTP 400)."""


@dataclass
class Completion:
    """The end of a job: the whole answer (stop string cut, stripped) and the counts for `usage`."""
    text: str
    finish_reason: str              # "stop" (EOS or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class Job:
    """One request inside an engine: the engine thread calls `emit` / `finish` / `fail`; the request's coroutine
    iterates the events. `cancelled` is read by the engine between decoding steps."""

    _ids = itertools.count(1)

    def __init__(self, prompt: str, prompt_ids: list[int], config: SamplingConfig,
                 loop: asyncio.AbstractEventLoop):
        self.id = next(self._ids)
        self.prompt, self.prompt_ids, self.config = prompt, prompt_ids, config
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_piece_at: float | None = None
        self.done = False

    # ---- engine side (any thread) ---------------------------------------------------------------------------
    def _put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:            # the request's loop is gone (server stopping): nobody is listening
            self.cancelled.set()

    def emit(self, piece: str) -> None:
        if piece and not self.done:
            if self.first_piece_at is None:
                self.first_piece_at = time.perf_counter()
            self._put(piece)

    def finish(self, completion: Completion) -> None:
        if not self.done:
            self.done = True
            self._put(completion)

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._put(error)

    # ---- request side ----------------------------------------------------------------------------------------
    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[str | Completion]:
        while True:
            event = await self.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Completion):
                return


class Engine(Protocol):
    tokenizer: object
    max_prompt_tokens: int

    def submit(self, prompt: str, config: SamplingConfig) -> Job: ...

    def close(self) -> None: ...

    def stats(self) -> dict: ...


def finish_reason(reason: str) -> str:
    """The sampler's "eos" | "stop" | "length" as OpenAI's finish_reason ("stop" | "length")."""
    return "length" if reason == "length" else "stop"


class SerialEngine:
    """Requests one after another on one thread, each decoded alone by `train.sampler.generate_detailed`;
    `max_queue` requests may wait."""

    def __init__(self, model, tokenizer, *, max_queue: int = 16, max_prompt_tokens: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.closed = False
        self.served = 0
        self.thread = threading.Thread(target=self._run, name="ohlora-engine", daemon=True)
        self.thread.start()

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        return ids

    def submit(self, prompt: str, config: SamplingConfig) -> Job:
        if self.closed:
            raise EngineClosed("the server is shutting down")
        job = Job(prompt, self.encode(prompt), config, asyncio.get_running_loop())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"all {self.queue.maxsize} queue places are taken") from None
        return job

    def stats(self) -> dict:
        return {"engine": "serial", "queued": self.queue.qsize(), "served": self.served}

    def close(self) -> None:
        self.closed = True
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None or self.closed:
                return
            if job.cancelled.is_set():
                continue

            def stream(_row: int, piece: str, job=job) -> None:
                if job.cancelled.is_set():
                    raise Cancelled
                job.emit(piece)

            try:
                out = generate_detailed(self.model, self.tokenizer, [job.prompt], job.config, stream=stream)
                job.finish(Completion(out.texts[0], finish_reason(out.finish_reasons[0]), len(job.prompt_ids),
                                      len(out.token_ids[0]), out.token_ids[0]))
            except Cancelled as e:
                job.fail(e)
            except Exception as e:  # a bug in decoding must not kill the engine thread: the request gets a 500
                job.fail(e)
            self.served += 1
