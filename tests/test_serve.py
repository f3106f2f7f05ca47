"""chat.serve: the OpenAI-compatible API through the official `openai` client and raw HTTP, on models whose answers
are known (EchoLM repeats the message) and on a tiny random GPT-NeoX: completions, streaming, usage, stop strings,
Korean-safe streams, memory per user, errors, limits, load, disconnects."""
from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server extra is not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e .[serve])")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e .[test])")

from chat.memory_db import MemoryDB
from chat.serve.app import ServerConfig, create_app
from chat.serve.openai_api import Limits
from data.sft import PromptTemplate
from infer.sampler import SamplingConfig
from tests.serve_fixtures import (
    STOP,
    EchoLM,
    echo_tokenizer,
    make_engine,
    running_server,
)

ECHO_SAMPLING = SamplingConfig(no_repeat_ngram_size=0)   # an echo repeats n-grams by design


class KeywordEncoder:
    """One axis per topic keyword: cosines are exactly 1 or 0 (no real encoder needed)."""
    TOPICS = [("음식", "먹", "떡볶이"), ("취미", "등산", "주말"), ("일정", "뭐 해")]
    source = "keyword-encoder-v1"

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), len(self.TOPICS)), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, words in enumerate(self.TOPICS):
                out[i, j] = float(any(w in t for w in words))
        return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return echo_tokenizer(tmp_path_factory.mktemp("tok"))


@contextlib.contextmanager
def echo_server(tmp_path, tok, *, bytewise=False, delay=0.0, encoder=None, api_key=None, limits=None,
                max_body_bytes=64 * 1024, cors_origins=(), **engine_kw):
    model = EchoLM(tok, bytewise=bytewise, delay=delay)
    engine = make_engine(model, tok, **engine_kw)
    db = MemoryDB(tmp_path / "memory.sqlite", encoder=encoder)
    config = ServerConfig(api_key=api_key, sampling=ECHO_SAMPLING, limits=limits or Limits(),
                          max_body_bytes=max_body_bytes, cors_origins=cors_origins)
    try:
        with running_server(create_app(engine, db, config)) as url:
            yield url, db, model, engine
    finally:
        engine.close()
        db.close()


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(url, method, path, body=None, headers=None):
    """(status, headers, decoded JSON or text) of one HTTP request; `body` bytes, or an object sent as JSON."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body, ensure_ascii=False).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read().decode("utf-8")
    conn.close()
    try:
        return response.status, dict(response.getheaders()), json.loads(data)
    except json.JSONDecodeError:
        return response.status, dict(response.getheaders()), data


def sse_events(url, body, headers=None):
    """The `data:` payloads of a streamed completion, read off the socket as they come."""
    status, hdrs, text = raw(url, "POST", "/v1/chat/completions", {**body, "stream": True}, headers)
    assert status == 200, text
    assert hdrs["content-type"].startswith("text/event-stream")
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: ") and line != "data: [DONE]"]


def ask(message, **kw):
    return {"model": "oh-lora", "messages": [{"role": "user", "content": message}], **kw}


# ---------------------------------------------------------------------------------------------------------
# Completions through the official client
# ---------------------------------------------------------------------------------------------------------

def test_plain_and_streamed_completion_usage_and_memory(tmp_path, tok):
    message = "[좋아하는 음식: 떡볶이] 오늘 저녁 뭐 먹을까?"
    prompt = PromptTemplate().prompt(message)
    answer_tokens = len(tok.encode(f" {message} {STOP}"))
    with echo_server(tmp_path, tok) as (url, db, _, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["oh-lora"]
        r = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": message}],
                                      user="alice")
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == "오늘 저녁 뭐 먹을까?"          # the item hidden, the marker cut
        assert r.choices[0].finish_reason == "stop"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), answer_tokens)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model_extra["memory"] == {"used": None, "stored": ["[좋아하는 음식: 떡볶이]"]}
        assert db.user("alice").items == ["[좋아하는 음식: 떡볶이]"]

        stream = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": message}],
                                           user="alice", stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "오늘 저녁 뭐 먹을까?"
        assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 4   # really streamed
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer_tokens
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].model_extra["memory"] == {"used": None}          # no memory model: no search
        assert db.user("alice").items == ["[좋아하는 음식: 떡볶이]"]       # stated again: still once


def test_max_tokens_gives_length_and_a_cut_syllable_never_shows(tmp_path, tok):
    with echo_server(tmp_path, tok, bytewise=True) as (url, _, _, _):
        c = client(url)
        for n in range(1, 9):       # " 안녕하세요" byte by byte: every cut, inside a syllable or between two
            r = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕하세요"}],
                                          max_tokens=n)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
            assert r.choices[0].message.content == "안녕하세요"[:(n - 1) // 3]
            events = sse_events(url, ask("안녕하세요", max_tokens=n))
            streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
            assert streamed == r.choices[0].message.content


def test_korean_stream_hides_items_and_split_marker(tmp_path, tok):
    """One token per byte: every syllable is split over 3 tokens and the marker over 14; the item's brackets
    and the marker arrive a byte at a time. No piece has U+FFFD, `(답변 종료)` or a bracket, the item is stored."""
    message = "[오늘 일정: 친구랑 카페 방문] 오늘은 친구랑 카페 가기로 했어"
    with echo_server(tmp_path, tok, bytewise=True) as (url, db, _, _):
        events = sse_events(url, ask(message, user="minji", max_tokens=300))
        pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
        assert "".join(pieces) == "오늘은 친구랑 카페 가기로 했어"
        assert len([p for p in pieces if p]) >= 8
        for piece in pieces:
            assert "\ufffd" not in piece and "[" not in piece and "]" not in piece
            assert "(답" not in piece and "종료" not in piece
        assert events[-1]["memory"] == {"stored": ["[오늘 일정: 친구랑 카페 방문]"]}
        assert db.user("minji").items == ["[오늘 일정: 친구랑 카페 방문]"]


def test_stop_strings(tmp_path, tok):
    with echo_server(tmp_path, tok) as (url, _, _, _):
        c = client(url)
        r = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕 친구야 반가워"}],
                                      stop=["반가", "없는 말"])
        assert r.choices[0].message.content == "안녕 친구야" and r.choices[0].finish_reason == "stop"
        r = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕 친구야 반가워"}],
                                      stop="친구")
        assert r.choices[0].message.content == "안녕"
        events = sse_events(url, ask("안녕 친구야 반가워", stop=["야 반"]))
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "안녕 친구"


def test_tiny_neox_through_the_server(tmp_path, tok):
    """A real (random) tiny GPT-NeoX: greedy plain = streamed = the sampler's own answer; a stop string taken
    from that answer cuts it there."""
    from core.tokenizer import Tokenizer
    from gptneox.load import load_model
    from infer.sampler import generate_detailed
    from tests.neox_fixtures import save_tiny_hf_neox, train_tiny_tokenizer

    folder = save_tiny_hf_neox(tmp_path / "neox")
    train_tiny_tokenizer(folder)
    model, ntok = load_model(folder).eval(), Tokenizer.from_folder(folder)
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    expected = generate_detailed(model, ntok, [PromptTemplate().prompt("안녕! 오늘 뭐 해?")], greedy)
    engine = make_engine(model, ntok)
    try:
        with running_server(create_app(engine, None, ServerConfig())) as url:
            c = client(url)
            r = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕! 오늘 뭐 해?"}],
                                          temperature=0, max_tokens=16)
            assert r.choices[0].message.content == expected.texts[0]
            assert r.usage.completion_tokens == len(expected.token_ids[0])
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="oh-lora", messages=[{"role": "user", "content": "안녕! 오늘 뭐 해?"}], temperature=0,
                max_tokens=16, stream=True) if ch.choices)
            assert streamed == expected.texts[0]
            text = expected.texts[0]
            stop = text[len(text) // 2:len(text) // 2 + 2]
            if stop.strip():
                r = c.chat.completions.create(model="oh-lora", temperature=0, max_tokens=16, stop=[stop],
                                              messages=[{"role": "user", "content": "안녕! 오늘 뭐 해?"}])
                assert r.choices[0].message.content == text[:text.find(stop)].strip()
                assert r.choices[0].finish_reason == "stop"
            a = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕"}],
                                          temperature=1.0, seed=7, max_tokens=12)
            b = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕"}],
                                          temperature=1.0, seed=7, max_tokens=12)
            assert a.choices[0].message.content == b.choices[0].message.content          # seed: reproducible
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------------------
# Memory per user
# ---------------------------------------------------------------------------------------------------------

def test_memory_is_per_user(tmp_path, tok):
    with echo_server(tmp_path, tok, encoder=KeywordEncoder()) as (url, db, _, _):
        c = client(url)
        c.chat.completions.create(model="oh-lora", user="alice",
                                  messages=[{"role": "user", "content": "[좋아하는 음식: 떡볶이] 나 떡볶이 좋아해"}])
        c.chat.completions.create(model="oh-lora", user="bob",
                                  messages=[{"role": "user", "content": "[취미: 주말마다 등산] 등산 좋아해"}])
        a = c.chat.completions.create(model="oh-lora", user="alice",
                                      messages=[{"role": "user", "content": "저녁 뭐 먹지"}])
        b = c.chat.completions.create(model="oh-lora", user="bob",
                                      messages=[{"role": "user", "content": "저녁 뭐 먹지"}])
        assert a.model_extra["memory"]["used"] == {"item": "[좋아하는 음식: 떡볶이]", "cosine": 1.0}
        assert b.model_extra["memory"]["used"] is None                      # alice's item is not bob's
        assert a.choices[0].message.content == "저녁 뭐 먹지"                  # the recalled item stays hidden
        none = c.chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "저녁 뭐 먹지"}])
        assert none.model_extra["memory"] == {"used": None, "stored": []}  # no user: no memory at all

        assert raw(url, "GET", "/v1/memory?user=alice")[2]["items"] == ["[좋아하는 음식: 떡볶이]"]
        assert raw(url, "GET", "/v1/memory?user=bob")[2]["items"] == ["[취미: 주말마다 등산]"]
        assert raw(url, "GET", "/v1/memory?user=carol")[2]["items"] == []
        # bob cannot delete alice's item by naming its key
        assert raw(url, "DELETE", "/v1/memory?" + urlencode({"user": "bob", "key": "좋아하는 음식"}))[2]["deleted"] == 0
        assert db.user("alice").items == ["[좋아하는 음식: 떡볶이]"]
        status, _, out = raw(url, "POST", "/v1/memory", {"user": "alice", "item": "[취미: 독서]"})
        assert status == 200 and out["items"] == ["[좋아하는 음식: 떡볶이]", "[취미: 독서]"]
        assert raw(url, "DELETE", "/v1/memory?" + urlencode({"user": "alice", "key": "취미"}))[2]["deleted"] == 1
        assert raw(url, "DELETE", "/v1/memory?user=alice")[2]["deleted"] == 1
        assert db.user("alice").items == [] and db.user("bob").items == ["[취미: 주말마다 등산]"]


# ---------------------------------------------------------------------------------------------------------
# Errors and limits
# ---------------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "oh-lora"}, 400, "messages"),
    ({"model": "oh-lora", "messages": "hi"}, 400, "messages"),
    ({"model": "oh-lora", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "oh-lora", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "oh-lora", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ({"model": "oh-lora", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"model": "oh-lora", "messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
    (ask("hi", max_tokens=0), 400, "max_tokens"),
    (ask("hi", max_tokens="8"), 400, "max_tokens"),
    (ask("hi", max_tokens=True), 400, "max_tokens"),
    (ask("hi", temperature="hot"), 400, "temperature"),
    (ask("hi", temperature=2.5), 400, "temperature"),
    (ask("hi", top_p=1.5), 400, "top_p"),
    (ask("hi", seed=1.5), 400, "seed"),
    (ask("hi", stream="yes"), 400, "stream"),
    (ask("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (ask("hi", stop=[1]), 400, "stop"),
    (ask("hi", n=2), 400, "n"),
    (ask("hi", user=""), 400, "user"),
    (ask("hi", user="x" * 129), 400, "user"),
    (ask("hi", user=7), 400, "user"),
    (ask("hi", stream_options={"include_usage": "yes"}), 400, "stream_options"),
    (ask("hi" * 3000), 400, "messages"),
]


def test_bad_requests_get_openai_error_objects(tmp_path, tok):
    with echo_server(tmp_path, tok, max_body_bytes=16 * 1024) as (url, _, _, _):
        for body, status, param in BAD_REQUESTS:
            got, headers, out = raw(url, "POST", "/v1/chat/completions", body)
            assert got == status, (body, out)
            assert set(out["error"]) == {"message", "type", "param", "code"}, out
            assert out["error"]["param"] == param and out["error"]["message"], (body, out)
            assert "Traceback" not in json.dumps(out)
        got, _, out = raw(url, "POST", "/v1/chat/completions", {**ask("hi"), "model": "gpt-4o"})
        assert got == 404 and out["error"]["code"] == "model_not_found"
        got, _, out = raw(url, "POST", "/v1/chat/completions", b"{" + b" " * 20000 + b"}")
        assert got == 413 and out["error"]["code"] == "request_too_large"
        got, _, out = raw(url, "POST", "/v1/chat/completions", ask("안녕 " * 600))       # < 4000 chars, > 512 tokens
        assert got == 400 and out["error"]["code"] == "context_length_exceeded" and "512" in out["error"]["message"]
        assert raw(url, "GET", "/v1/nothing")[0] == 404
        got, _, out = raw(url, "GET", "/v1/chat/completions")
        assert got == 405 and out["error"]["type"] == "invalid_request_error"
        got, _, out = raw(url, "GET", "/v1/memory")
        assert got == 400 and out["error"]["param"] == "user"
        got, _, out = raw(url, "POST", "/v1/memory", {"user": "a", "item": "no brackets"})
        assert got == 400 and out["error"]["param"] == "item"
        # the official client raises its typed errors from these objects
        with pytest.raises(openai.NotFoundError):
            client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            client(url).chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "hi"}],
                                                temperature=9)
        r = client(url).chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕"}],
                                                max_tokens=10 ** 6)            # capped, not refused
        assert r.choices[0].finish_reason == "stop"


def test_api_key_guards_every_api_route(tmp_path, tok):
    with echo_server(tmp_path, tok, api_key="s3cret") as (url, _, _, _):
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", ask("hi")),
                                   ("GET", "/v1/memory?user=a", None), ("DELETE", "/v1/memory?user=a", None),
                                   ("POST", "/v1/memory", {"user": "a", "item": "[a: b]"})]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                status, _, out = raw(url, method, path, body, headers)
                assert status == 401 and out["error"]["code"] == "invalid_api_key", (method, path, headers)
            assert raw(url, method, path, body, {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        r = client(url, "s3cret").chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "hi"
        status, headers, page = raw(url, "GET", "/")                         # the page itself is public
        assert status == 200 and "<title>오로라</title>" in page
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "access-control-allow-origin" not in {k.lower() for k in headers}   # CORS off


def test_cors_only_for_the_origins_asked(tmp_path, tok):
    with echo_server(tmp_path, tok, cors_origins=("http://app.example",)) as (url, _, _, _):
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        status, headers, _ = raw(url, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        status, headers, _ = raw(url, "OPTIONS", "/v1/chat/completions",
                                 headers={**preflight, "Origin": "http://evil.example"})
        assert status == 400 and "access-control-allow-origin" not in headers
        _, headers, out = raw(url, "POST", "/v1/chat/completions", ask("hi"), {"Origin": "http://app.example"})
        assert headers["access-control-allow-origin"] == "http://app.example" and out["choices"]


def test_full_queue_answers_429(tmp_path, tok):
    with echo_server(tmp_path, tok, delay=0.02, max_queue=2, max_batch=1) as (url, _, _, _):
        def one(i):
            return raw(url, "POST", "/v1/chat/completions", ask(f"안녕 {i}"))
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        statuses = sorted(r[0] for r in results)
        assert 429 in statuses and set(statuses) <= {200, 429}, statuses
        busy = next(r for r in results if r[0] == 429)
        assert busy[1]["retry-after"] == "1" and busy[2]["error"]["type"] == "rate_limit_error"
        assert all(r[2]["choices"][0]["message"]["content"] == f"안녕 {i}" for i, r in enumerate(results)
                   if r[0] == 200)


def test_disconnect_frees_the_slot(tmp_path, tok):
    """A streaming client that hangs up after the first piece: its request stops decoding at once."""
    with echo_server(tmp_path, tok, delay=0.05, max_batch=1) as (url, _, model, engine):
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(ask("가 " * 60, stream=True, max_tokens=200)),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.fp.readline()                                      # the first event: decoding has started
        conn.sock.close()
        conn.close()
        time.sleep(0.5)
        before = model.forwards
        time.sleep(0.5)
        assert model.forwards == before                              # nothing is decoding any more
        start = time.perf_counter()
        r = client(url).chat.completions.create(model="oh-lora", messages=[{"role": "user", "content": "안녕"}])
        assert r.choices[0].message.content == "안녕"
        assert time.perf_counter() - start < 2.0                     # the slot was free (60 tokens would be 3 s)
        # the same for a plain (non-streamed) request whose client gives up while it is decoding
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(ask("나 " * 60, max_tokens=200)),
                     headers={"Content-Type": "application/json"})
        time.sleep(0.5)
        assert engine.stats()["active"] == 1
        conn.sock.close()
        conn.close()
        time.sleep(0.5)
        assert engine.stats()["active"] == 0
        before = model.forwards
        time.sleep(0.3)
        assert model.forwards == before


def test_16_clients_x_10_requests(tmp_path, tok):
    """16 concurrent clients (own user each), 10 requests each, half streamed: no error, and every item a user
    stated is stored exactly once in that user's space."""
    with echo_server(tmp_path, tok, max_queue=32) as (url, db, _, engine):
        errors = []

        def run(u):
            c = client(url)
            for i in range(10):
                item = f"[사실{i}: 사용자{u}의 값 {i}]"
                messages = [{"role": "user", "content": f"{item} 기억해줘 {i}"}]
                try:
                    if i % 2:
                        chunks = list(c.chat.completions.create(model="oh-lora", messages=messages, user=f"u{u}",
                                                                stream=True))
                        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                        stored = chunks[-1].model_extra["memory"]["stored"]
                    else:
                        r = c.chat.completions.create(model="oh-lora", messages=messages, user=f"u{u}")
                        text, stored = r.choices[0].message.content, r.model_extra["memory"]["stored"]
                    if text != f"기억해줘 {i}" or stored != [item]:
                        errors.append((u, i, text, stored))
                except Exception as e:  # noqa: BLE001 - every failure is reported by the assert below
                    errors.append((u, i, repr(e)))

        threads = [threading.Thread(target=run, args=(u,)) for u in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert errors == []
        for u in range(16):
            assert db.user(f"u{u}").items == [f"[사실{i}: 사용자{u}의 값 {i}]" for i in range(10)]
        assert db.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 160
        assert db.integrity() == "ok"
        stats = engine.stats()
        assert stats["served"] == 160 and stats["active"] == stats["queued"] == 0
        assert stats["tokens"] > 2 * stats["steps"]                    # rows really decoded together
