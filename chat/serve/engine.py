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
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from core.errors import OhLoRAError
from infer.batching import BatchRequest, ContinuousBatcher
from infer.sampler import SamplingConfig


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
        self.done = False

    # ---- engine side (any thread) ---------------------------------------------------------------------------
    def _put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:            # the request's loop is gone (server stopping): nobody is listening
            self.cancelled.set()

    def emit(self, piece: str) -> None:
        if piece and not self.done:
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


class BatchEngine:
    """Every request decoded in one continuous batch (infer.batching.ContinuousBatcher) on the engine's thread:
    up to `max_batch` rows decode together, a request joins at the next step and leaves when done; up to
    `max_queue` more wait for a row (EngineBusy beyond). A cancelled job leaves the batch at the next step and
    gives its queue place back at once."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 32, max_prompt_tokens: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_prompt_tokens = max_batch, max_queue, max_prompt_tokens
        self.batcher = ContinuousBatcher(model, tokenizer, max_batch=max_batch)
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}                # BatchRequest.id -> its job, while in the batcher
        self.lock = threading.Condition()
        self.closed = False
        self.served = self.generated = 0
        self.thread = threading.Thread(target=self._run, name="ohlora-engine", daemon=True)
        self.thread.start()

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        return ids

    def submit(self, prompt: str, config: SamplingConfig) -> Job:
        job = Job(prompt, self.encode(prompt), config, asyncio.get_running_loop())
        with self.lock:
            if self.closed:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_queue:       # places held by clients that left are given back first
                self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{self.max_batch} requests are decoding and {self.max_queue} waiting")
            self.waiting.append(job)
            self.lock.notify()
        return job

    def stats(self) -> dict:
        with self.lock:
            return {"engine": "continuous-batching", "max_batch": self.max_batch, "active": len(self.jobs),
                    "queued": len(self.waiting), "served": self.served, "tokens": self.generated,
                    "steps": self.batcher.steps}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=30)

    def _admit(self) -> bool:
        """Move waiting jobs into the batcher's free rows (blocking while there is nothing at all to do).
        Returns False when the engine is closing."""
        with self.lock:
            while not self.closed and not self.waiting and not self.batcher.busy:
                self.lock.wait()
            if self.closed:
                return False
            while self.waiting and self.batcher.free_rows > 0:
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    continue
                request = BatchRequest(job.prompt_ids, job.config, on_piece=job.emit, cancelled=job.cancelled.is_set)
                self.jobs[request.id] = job
                self.batcher.add(request)
        return True

    def _run(self) -> None:
        while self._admit():
            try:
                finished = self.batcher.step()
            except Exception as e:  # a failed step fails its requests (HTTP 500), not the engine
                with self.lock:
                    jobs, self.jobs = list(self.jobs.values()), {}
                    self.batcher = ContinuousBatcher(self.model, self.tokenizer, max_batch=self.max_batch)
                for job in jobs:
                    job.fail(e)
                continue
            for request in finished:
                with self.lock:
                    job = self.jobs.pop(request.id)
                    self.served += 1
                    self.generated += len(request.token_ids)
                if request.finish_reason == "cancelled":
                    job.fail(Cancelled())
                else:
                    job.finish(Completion(request.text, finish_reason(request.finish_reason),
                                          len(request.prompt_ids), len(request.token_ids), request.token_ids))
        with self.lock:                                  # closing: nobody will decode what is left
            left = list(self.jobs.values()) + list(self.waiting)
            self.jobs, self.waiting = {}, deque()
        for job in left:
            job.fail(EngineClosed("the server is shutting down"))
