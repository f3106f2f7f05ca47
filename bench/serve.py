"""Serving throughput and latency: `python -m chat.serve` under 1, 4 and 8 concurrent streaming clients.

    flock /tmp/ohlora-heavy.lock python -m bench.serve [--streams 1 4 8] [--requests-per-stream 3] [--max-tokens 64]

Starts the server as its own process (what `python -m chat.serve` loads: runs/sft/best and its base — the
real Gemma-3 270M after the default `python -m train.sft` — with --no-memory-store, so only the model is
measured), then for each N runs N client threads, each sending `--requests-per-stream` streamed chat
completions back to back (at least 8 requests in all; the validation questions of data/ohlora_sft.csv,
greedy, so a question always gets the same answer). Reported per N:

    aggregate tokens/s   completion tokens of all requests / wall time of the phase
    TTFT p50 / p95       request sent -> first content chunk received
    errors               any status other than 200 or a stream without [DONE]

and the ratio of N streams' aggregate tokens/s to one stream's (target: 8 streams >= 4x; p95 TTFT <= 1.0 s at 8).

With a llama.cpp build (`llama-server` in $OHLORA_LLAMA_CPP, ~/.cache/ohlora/llama.cpp or PATH), the same load
runs against `llama-server --parallel N` serving our adapter merged and exported to GGUF (chat.export, bf16),
through its /v1/completions with our prompt template; otherwise that row is skipped, saying why.
`run(...) -> dict` returns the figures.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(limit: int = 24) -> list[str]:
    from data.sft import load_sft_csv
    from train.default_model import bundled_data_path
    data = load_sft_csv(bundled_data_path())
    return [p.input_text for p in data.valid][:limit]


def stream_once(port: int, path: str, body: dict) -> dict:
    """One streamed request: {ttft, tokens, ok}. Tokens from the final usage chunk, else one per content chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    ttft, tokens, chunks, done = None, None, 0, False
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"ok": False, "status": response.status, "ttft": None, "tokens": 0}
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if text:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    except (OSError, http.client.HTTPException) as e:
        return {"ok": False, "status": repr(e), "ttft": ttft, "tokens": 0}
    finally:
        conn.close()
    return {"ok": done, "status": 200, "ttft": ttft, "tokens": tokens if tokens is not None else chunks}


def load_phase(port: int, streams: int, per_stream: int, make_body, prompts: list[str]) -> dict:
    per_stream = max(per_stream, -(-8 // streams))          # at least 8 requests in all (one stream: 8 in a row)
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_stream):
            out = stream_once(port, *make_body(prompts[(k * per_stream + j) % len(prompts)]))
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"streams": streams, "requests": len(results), "errors": sum(not r["ok"] for r in results),
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3) if ttfts else None}


def wait_ready(proc: subprocess.Popen, port: int, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not become ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(start_server, ready_path: str, make_body, streams: list[int], per_stream: int,
            prompts: list[str]) -> list[dict]:
    rows = []
    for n in streams:
        port = free_port()
        proc = start_server(port, n)
        try:
            wait_ready(proc, port, ready_path)
            stream_once(port, *make_body(prompts[0]))                       # warm-up
            rows.append(load_phase(port, n, per_stream, make_body, prompts))
        finally:
            stop(proc)
        print(f"  {n} stream(s): {rows[-1]}", file=sys.stderr, flush=True)
    base = rows[0]["tokens_per_s"] if rows and rows[0]["streams"] == 1 else None
    for row in rows:
        row["vs_1_stream"] = round(row["tokens_per_s"] / base, 2) if base else None
    return rows


def find_llama_server() -> tuple[str | None, str]:
    candidates = [os.environ.get("OHLORA_LLAMA_CPP", ""), str(Path.home() / ".cache/ohlora/llama.cpp")]
    for folder in filter(None, candidates):
        for path in sorted(Path(folder).glob("**/llama-server")) if Path(folder).is_dir() else []:
            if path.is_file() and os.access(path, os.X_OK):
                return str(path), ""
    found = shutil.which("llama-server")
    if found:
        return found, ""
    return None, "no llama.cpp build (llama-server not in $OHLORA_LLAMA_CPP, ~/.cache/ohlora/llama.cpp or PATH)"


def run(streams: list[int], per_stream: int = 3, max_tokens: int = 64, threads: int = 2,
        adapter: str | None = None, llama: bool = True) -> dict:
    from data.sft import PromptTemplate

    prompts = questions()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = ["--adapter", adapter] if adapter else []

    def ours(port: int, n: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "chat.serve", "--port", str(port), "--no-memory-store",
                                 "--threads", str(threads), "--max-batch", str(max(n, 1)), "--dtype", "auto",
                                 *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def our_body(message: str):
        return "/v1/chat/completions", {"model": "oh-lora", "messages": [{"role": "user", "content": message}],
                                        "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                        "stream_options": {"include_usage": True}}

    print("chat.serve (continuous batching):", file=sys.stderr)
    result = {"ours": measure(ours, "/health", our_body, streams, per_stream, prompts),
              "max_tokens": max_tokens, "requests_per_stream": per_stream, "threads": threads,
              "load_average": os.getloadavg()}

    binary, why = find_llama_server() if llama else (None, "skipped (--no-llama)")
    if binary is None:
        result["llama_server"] = {"skipped": why}
        print(f"llama-server: {why}", file=sys.stderr)
        return result
    gguf = ROOT / "runs/bench-serve/merged-bf16.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "chat.export", "--adapter", adapter or "runs/sft/best",
                        "--gguf", str(gguf), "--type", "bf16"], env=env, check=True, stdout=sys.stderr)
    template = PromptTemplate()

    def llama_server(port: int, n: int) -> subprocess.Popen:
        return subprocess.Popen([binary, "-m", str(gguf), "--port", str(port), "--parallel", str(n),
                                 "-c", str(1024 * n), "-t", str(threads), "-tb", str(threads), "--no-webui"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def llama_body(message: str):
        return "/v1/completions", {"prompt": template.prompt(message), "max_tokens": max_tokens, "temperature": 0,
                                   "stop": ["(답변 종료)"], "stream": True, "stream_options": {"include_usage": True}}

    print(f"llama-server --parallel N ({binary}):", file=sys.stderr)
    result["llama_server"] = measure(llama_server, "/health", llama_body, streams, per_stream, prompts)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapter", default=None, help="LoRA adapter (default: runs/sft/best and its base)")
    p.add_argument("--no-llama", action="store_true", help="skip the llama-server rows")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    result = run(args.streams, args.requests_per_stream, args.max_tokens, args.threads, args.adapter,
                 llama=not args.no_llama)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"load average {result['load_average']}; greedy, max_tokens {args.max_tokens}, "
          f"{args.requests_per_stream} requests per stream, {args.threads} threads")
    for name in ("ours", "llama_server"):
        rows = result[name]
        if isinstance(rows, dict):
            print(f"{name}: {rows['skipped']}")
            continue
        for r in rows:
            print(f"{name:12s} {r['streams']} stream(s): {r['tokens_per_s']:7.2f} tok/s ({r['vs_1_stream']}x 1 stream)"
                  f"  TTFT p50 {r['ttft_p50_s']} s  p95 {r['ttft_p95_s']} s  errors {r['errors']}/{r['requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
