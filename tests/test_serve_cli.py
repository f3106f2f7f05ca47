"""`python -m chat.serve` as a process: flags and their errors, a tiny GPT-NeoX served for real, and SIGKILL during
memory writes: the restarted server's SQLite store is intact and holds every write that was acknowledged."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e .[serve])")

from chat.memory_db import MemoryDB

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.neox_fixtures import save_tiny_hf_neox, train_tiny_tokenizer
    folder = save_tiny_hf_neox(tmp_path_factory.mktemp("neox"))
    train_tiny_tokenizer(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OHLORA_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "chat.serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return json.load(r)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not become healthy")


def call(url: str, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_flag_errors_are_one_line(tmp_path, tiny_folder):
    for args, expected in [(["--memory-store", str(tmp_path / "m.txt"), "--model", str(tiny_folder)],
                            "the server keeps memory in SQLite"),
                           (["--port", "70000"], "--port: must be in [0, 65535]"),
                           (["--model", str(tmp_path / "none")], "folder not found"),
                           ([], "run `python -m train.sft` first")]:
        proc = start(args, tmp_path)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out
        assert expected in out and "Traceback" not in out, out


def test_sigkill_during_writes_keeps_every_acknowledged_item(tmp_path, tiny_folder):
    port, db_path = free_port(), tmp_path / "memory.sqlite"
    url = f"http://127.0.0.1:{port}"
    args = ["--model", str(tiny_folder), "--memory-store", str(db_path), "--port", str(port), "--no-pack",
            "--threads", "1"]
    proc = start(args, tmp_path)
    try:
        health = wait_healthy(proc, url)
        assert health["status"] == "ok"
        # a real completion from the tiny model, through the process
        status, out = call(url, "POST", "/v1/chat/completions",
                           {"model": "oh-lora", "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 5,
                            "user": "w0"})
        assert status == 200 and out["usage"]["completion_tokens"] <= 5

        acknowledged: dict[str, list[str]] = {f"w{t}": [] for t in range(4)}
        stop = threading.Event()

        def writer(user: str) -> None:
            n = 0
            while not stop.is_set():
                item = f"[사실{n}: {user}의 값 {n}]"
                try:
                    status, out = call(url, "POST", "/v1/memory", {"user": user, "item": item}, timeout=5)
                except (OSError, urllib.error.URLError, ValueError):
                    return                                           # the server is gone
                if status == 200 and out["changed"]:
                    acknowledged[user].append(item)
                n += 1

        threads = [threading.Thread(target=writer, args=(u,)) for u in acknowledged]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(map(len, acknowledged.values())) < 80 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)                             # mid-write: the writers are still going
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        assert sum(map(len, acknowledged.values())) >= 80
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()

    proc = start(args, tmp_path)                                     # restart on the same file
    try:
        wait_healthy(proc, url)
        for user, items in acknowledged.items():
            status, out = call(url, "GET", f"/v1/memory?user={user}")
            assert status == 200
            stored = out["items"]
            assert stored[:len(items)] == items                      # every acknowledged write, in order
            assert len(stored) <= len(items) + 1                     # at most the one in flight at the kill
        with MemoryDB(db_path) as db:                                # a second connection: WAL lets it read
            assert db.integrity() == "ok"
        proc.send_signal(signal.SIGTERM)                             # a clean stop (uvicorn exits by the signal)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Application shutdown complete" in out and "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
