"""OpenAI's chat-completions wire format: request validation, error objects, responses and stream chunks.

    req = parse_chat_request(body, defaults, limits)     # ApiError(400/404) naming the field, else a ChatRequest
    completion_response(...) / chunk(...)                # the JSON objects the official clients parse

Errors are OpenAI's objects: `{"error": {"message", "type", "param", "code"}}` with the HTTP status. Fields we
do not implement are ignored when they are OpenAI's no-op value and refused otherwise (`n` > 1, `logprobs`,
`tools`), never silently dropped. `max_tokens` (or `max_completion_tokens`) is capped at the server's limit.
Extras (as vLLM and llama.cpp's server accept): `top_k`, `repetition_penalty`.

Only the last message is answered: 오로라's prompt format is single-turn (`{input} (답변 시작) ### 답변:`, as in
`python -m chat`), so earlier messages are checked but not sent to the model.
"""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass

from chat.memory_db import check_user
from data.memory_items import MemoryFormatError
from infer.sampler import SamplingConfig

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_STOP_LENGTH = 64


class ApiError(Exception):
    """An HTTP error answered as an OpenAI error object."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 512            # cap on max_tokens
    max_message_chars: int = 4000    # the answered message's length (the prompt's token limit is the engine's)
    max_messages: int = 256


@dataclass
class ChatRequest:
    message: str                     # the user's last message, whitespace collapsed
    config: SamplingConfig           # the server's defaults with the request's settings
    stream: bool = False
    include_usage: bool = False
    user: str | None = None          # the memory space; None: no memory for this request


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kind) or not finite:
        raise _bad(f"{name}: expected {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise _bad(f"{name}: must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}", name)
    return value


def _text_of(content, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{k}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                           "supported", f"{where}.content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"{where}.content: expected a string or a list of text parts", f"{where}.content")


def parse_chat_request(body: object, model_name: str, defaults: SamplingConfig, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body; the first problem raises ApiError naming the field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: required string (see GET /v1/models)", "model")
    if model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{model_name}`",
                       param="model", code="model_not_found")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: required non-empty array", "messages")
    if len(messages) > limits.max_messages:
        raise _bad(f"messages: at most {limits.max_messages} messages", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where}: expected an object with role and content", where)
        if m.get("role") not in ROLES:
            raise _bad(f"{where}.role: must be one of {', '.join(ROLES)}, got {m.get('role')!r}", f"{where}.role")
        if m.get("content") is not None or m.get("role") != "assistant":
            _text_of(m.get("content"), where)
    last = messages[-1]
    if last["role"] != "user":
        raise _bad(f"messages[{len(messages) - 1}]: the last message must be the user's", "messages")
    message = " ".join(_text_of(last["content"], f"messages[{len(messages) - 1}]").split())
    if not message:
        raise _bad("messages: the last user message is empty", "messages")
    if len(message) > limits.max_message_chars:
        raise _bad(f"messages: the last message has {len(message)} characters; at most {limits.max_message_chars}",
                   "messages", "context_length_exceeded")

    if body.get("n") not in (None, 1):
        raise _bad("n: only 1 choice per request is supported", "n")
    if body.get("logprobs") not in (None, False):
        raise _bad("logprobs: not supported", "logprobs")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools: not supported", "tools")

    changes: dict = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = _number(body, name, 1, float("inf"), integer=True)
        if value is not None:
            changes["max_new_tokens"] = min(value, limits.max_tokens)
    changes.setdefault("max_new_tokens", min(defaults.max_new_tokens, limits.max_tokens))
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if temperature is not None:
        changes["temperature"] = float(temperature)
    if top_p is not None:
        if top_p == 0:                   # OpenAI allows 0: only the most likely token, i.e. greedy
            changes["temperature"] = 0.0
        else:
            changes["top_p"] = float(top_p)
    top_k = _number(body, "top_k", 0, 1 << 30, integer=True)
    if top_k is not None:
        changes["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0, 10, lo_open=True)
    if penalty is not None:
        changes["repetition_penalty"] = float(penalty)
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    if seed is not None:
        changes["seed"] = seed

    stop = body.get("stop")
    stops: list[str] = []
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop: expected a string or an array of strings", "stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise _bad(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_LENGTH} characters", "stop")
    changes["stop_strings"] = tuple(dict.fromkeys([*defaults.stop_strings, *(s for s in stops if s)]))
    config = dataclasses.replace(defaults, **changes)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream: expected a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options: expected {\"include_usage\": true|false}", "stream_options")
        include_usage = options.get("include_usage", False)

    user = body.get("user")
    if user is not None:
        try:
            user = check_user(user)
        except MemoryFormatError as e:
            raise _bad(str(e), "user") from None
    return ChatRequest(message, config, stream, include_usage, user or None)


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(cid: str, created: int, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int, memory: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens), "memory": memory}


def chunk(cid: str, created: int, model: str, delta: dict | None, finish: str | None = None, *,
          usage_: dict | None = None, memory: dict | None = None) -> dict:
    """One `chat.completion.chunk`; with `delta=None` the usage-only chunk (empty choices) OpenAI sends last."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}
    if usage_ is not None or delta is None:
        out["usage"] = usage_
    if memory is not None:
        out["memory"] = memory
    return out


def models_response(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "oh-lora"}]}


def now() -> int:
    return int(time.time())
