"""`python -m chat.serve`: 오로라 behind an OpenAI-compatible HTTP API, with a chat page and memory per user.

    python -m chat.serve                                   # what `python -m chat` loads, on http://127.0.0.1:8000
    python -m chat.serve --host 0.0.0.0 --api-key KEY      # reachable from the network: set a key (or OHLORA_API_KEY)

It loads what `python -m chat` loads (the same flags: --model, --adapter, --memory-model, --dtype, sampling
defaults) and keeps every user's memory in one SQLite file (`--memory-store runs/memory.sqlite`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from chat.cli import (
    ChatError,
    ChatOptions,
    load_chat_model,
    load_memory_model,
    resolve_model_dirs,
)
from chat.memory_db import MemoryDB, is_sqlite_path
from chat.serve.openai_api import Limits
from core.cli import (
    COUNT,
    Parser,
    add_config_flags,
    choose_dtype,
    config_from_args,
    flag,
    run_cli,
)
from infer.sampler import SamplingConfig

DEFAULT_DB = Path("runs/memory.sqlite")
API_KEY_ENV = "OHLORA_API_KEY"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeOptions:
    """`python -m chat.serve` flags besides the chat's model and sampling ones."""
    host: str = flag("127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    port: int = flag(8000, range="[0, 65535]", help="TCP port (0: any free port, printed at start)")
    memory_store: str = flag(str(DEFAULT_DB), kind="output_file", help="SQLite file with every user's memory")
    no_memory_store: bool = flag(False, help="keep no memory at all (the /v1/memory routes answer 404)")
    api_key: str | None = flag(None, metavar="KEY", help=f"require `Authorization: Bearer KEY` on /v1 routes (default: "
                                          f"${API_KEY_ENV} if set, else none)")
    model_name: str = flag("oh-lora", metavar="NAME", help="the model id clients send (GET /v1/models)")
    max_body_bytes: int = flag(64 * 1024, range=COUNT, help="largest request body accepted (413 above)")
    max_prompt_tokens: int = flag(512, range=COUNT, help="largest templated prompt in tokens (400 above)")
    max_tokens_cap: int = flag(512, range=COUNT, help="max_tokens a request may ask for (larger values are capped)")
    max_batch: int = flag(8, range=COUNT, help="requests decoded together (continuous batching)")
    max_queue: int = flag(32, range=COUNT, help="requests that may wait for a free batch row (429 beyond)")
    cors_origin: tuple[str, ...] | None = flag(None, metavar="ORIGIN",
                                               help="allow these browser origins (CORS off unless given)")
    threads: int | None = flag(None, range=COUNT, help="CPU threads for the model (default: torch's)")


def build_parser() -> Parser:
    p = Parser(prog="python -m chat.serve", description="Serve 오로라 over an OpenAI-compatible HTTP API.")
    add_config_flags(p, ServeOptions)
    add_config_flags(p, ChatOptions, exclude=("once", "user", "memory_store", "no_memory"))
    p.add_argument("--no-memory", action="store_true", help="do not search the memory (items are still stored)")
    add_config_flags(p, SamplingConfig, exclude=("do_sample", "stop_strings", "seed"),
                     overrides={"max_new_tokens": {"help": "max_tokens when a request gives none"}},
                     group="sampling defaults (a request's own fields win)")
    return p


def build_server(argv: list[str] | None = None):
    """(Starlette app, ServeOptions) from the flags: loads the model, the memory model and the database."""
    from chat.serve.app import ServerConfig, create_app
    from chat.serve.engine import BatchEngine

    args = build_parser().parse_args(argv)
    opts = config_from_args(ServeOptions, args)
    chat = config_from_args(ChatOptions, args, once=None)
    sampling = config_from_args(SamplingConfig, args)
    api_key = opts.api_key if opts.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not opts.no_memory_store and not is_sqlite_path(opts.memory_store):
        raise ChatError(f"--memory-store: {opts.memory_store}: the server keeps memory in SQLite; give a .sqlite "
                        "or .db file")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model_dir, adapter_dir = resolve_model_dirs(chat.model, chat.adapter)
    dtype_name, dtype_note = choose_dtype(chat.dtype, "cpu")
    if dtype_note:
        print(dtype_note, file=sys.stderr)
    model, tokenizer = load_chat_model(model_dir, adapter_dir, torch.bfloat16 if dtype_name == "bf16"
                                       else torch.float32, pack=not chat.no_pack)
    memory = None
    if not opts.no_memory_store:
        encoder, note = load_memory_model(Path(opts.memory_store), chat.memory_model, args.no_memory)
        if note:
            print(note, file=sys.stderr)
        memory = MemoryDB(opts.memory_store, encoder=encoder)
    engine = BatchEngine(model, tokenizer, max_batch=opts.max_batch, max_queue=opts.max_queue,
                         max_prompt_tokens=opts.max_prompt_tokens)
    config = ServerConfig(model_name=opts.model_name, api_key=api_key, max_body_bytes=opts.max_body_bytes,
                          cors_origins=tuple(opts.cors_origin or ()), sampling=sampling,
                          limits=Limits(max_tokens=opts.max_tokens_cap))
    print(f"serving {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
          f" as `{opts.model_name}`; memory: {opts.memory_store if memory else 'off'}; API key: "
          f"{'required' if api_key else 'none'}", file=sys.stderr)
    if opts.host not in LOOPBACK and not api_key:
        print(f"note: --host {opts.host} is reachable from other machines and no --api-key is set: anyone who "
              "can reach it can use the model and read every user's memory", file=sys.stderr)
    return create_app(engine, memory, config, close_on_shutdown=True), opts


@run_cli
def main(argv: list[str] | None = None) -> int:
    import uvicorn

    app, opts = build_server(argv)
    # SIGINT / SIGTERM: uvicorn stops accepting, finishes (or after 5 s drops) open requests, runs the app's
    # shutdown (engine and database closed), then exits by the same signal, as its convention is
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5)
    return 0
