"""`python -m chat`: talk to the fine-tuned model, with an S-BERT memory of `[key: value]` items.

One turn:

    best = memory.best_memory(message)                      # most similar stored item, cosine >= 0.6, or None
    prompt = PromptTemplate().prompt(f"{best} {message}")    # "{input} (답변 시작) ### 답변:"
    raw = generate(model, tokenizer, [prompt], config)[0]   # until "(답변 종료)", EOS or max_new_tokens
    memory += extract_memory_items(raw)                     # e.g. "[좋아하는 음식: 떡볶이]", saved to the file
    show strip_memory_items(raw)                             # the answer without its [key: value] items

Model: `--model PATH` (an HF folder of either family with tokenizer.json, or a Gemma .gguf file) + `--adapter DIR`
(PEFT LoRA), merged into the weights once at start-up so decoding costs the same as the base model, and on CPU
the linear weights are pre-packed for oneDNN (`core.onednn`: faster batch-1 decoding, same numbers; `--no-pack`
to skip).
With neither flag it uses what `python -m train.sft` saved: the adapter `runs/sft/best/` and its base (the
folder or GGUF file the adapter names — the real Gemma-3 270M for the default run — else `runs/sft/base/`).

Memory: `--memory-model DIR` (a sentence-transformers folder; default `runs/sbert/best` when
`python -m sbert.train` has made it) and `--memory-store FILE` (default `runs/memory.txt`; a `.sqlite` file is
the per-user database `python -m chat.serve` keeps, `--user NAME` choosing the space). Without a memory model the
chat works without memory (said once) but still saves the items answers produce.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bert.bases import TRAINED_DIR
from chat.memory import MemorySearch, MemoryStore, TextEncoder, load_memory_encoder
from chat.memory_db import MemoryDB, is_sqlite_path
from core.cli import DTYPE_CHOICES, Parser, add_config_flags, choose_dtype, config_from_args, flag, run_cli
from core.errors import OhLoRAError
from data.memory_items import ItemFilter, strip_memory_items
from data.sft import PromptTemplate
from infer.prefix_cache import PrefixCache
from infer.sampler import SamplingConfig, generate
from lora.io import adapter_base_model

DEFAULT_BASE = Path("runs/sft/base")
DEFAULT_ADAPTER = Path("runs/sft/best")
DEFAULT_STORE = Path("runs/memory.txt")
DEFAULT_USER = "default"
EXIT_WORDS = {"exit", "quit", "/exit", "/quit", "종료"}


class ChatError(OhLoRAError):
    """A chat set-up or input problem, with a message meant for the user (CLI: printed, exit 2)."""


@dataclass
class ChatReply:
    answer: str                                  # shown to the user: no [key: value] items
    raw: str                                     # what the model produced (stop marker already cut)
    prompt: str                                  # the full prompt given to the model
    memory: tuple[str, float] | None = None      # the item prepended to the message, with its cosine
    stored: list[str] = field(default_factory=list)  # items from the answer that changed the store


class ChatSession:
    """Model + tokenizer + memory. `reply(message)` runs one turn; `generate_fn` is the sampler, called as
    infer.sampler.generate is (default: it). It gets the session's `PrefixCache`: a turn prefills only the tokens
    after the prefix it shares with the previous turn's prompt + answer (and a retry of an empty answer only the
    prompt's last token); `reuse_prefix=False` prefills every turn in full."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: SamplingConfig | None = None,
                 memory: MemorySearch | None = None, *, use_memory_search: bool = True,
                 template: PromptTemplate | None = None, generate_fn: Callable | None = None,
                 reuse_prefix: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or SamplingConfig()
        self.memory = memory
        self.use_memory_search = use_memory_search and memory is not None
        self.template = template or PromptTemplate()
        self.generate_fn = generate_fn
        self.prefix_cache = PrefixCache() if reuse_prefix else None

    def reply(self, message: str, stream: Callable[[str], None] | None = None) -> ChatReply:
        message = " ".join((message or "").split())
        if not message:
            raise ChatError("empty message: type something to say to 오로라")
        user_text, best = self.memory.recall(message) if self.use_memory_search else (message, None)
        prompt = self.template.prompt(user_text)
        item_filter = ItemFilter(stream) if stream is not None else None
        on_piece = (lambda _row, piece: item_filter.feed(piece)) if item_filter is not None else None
        generate_fn = self.generate_fn or generate   # the module's sampler, looked up at call time
        raw = generate_fn(self.model, self.tokenizer, [prompt], self.config, stream=on_piece,
                          prefix_cache=self.prefix_cache)[0]
        if item_filter is not None:
            item_filter.close()
        stored = self.memory.remember(raw) if self.memory is not None else []
        return ChatReply(strip_memory_items(raw), raw, prompt, best, stored)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def resolve_model_dirs(model: str | Path | None, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(base model: HF folder or .gguf file, adapter folder or None) from the flags, falling back to what
    `train.sft` saved: its adapter and the base it names (the real Gemma GGUF, or runs/sft/base)."""
    if model is not None:
        model = Path(model)
        if not model.exists():
            raise ChatError(f"{model}: --model folder or GGUF file not found")
        return model, Path(adapter) if adapter is not None else None
    adapter = Path(adapter) if adapter is not None else DEFAULT_ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        if adapter == DEFAULT_ADAPTER:
            raise ChatError(f"{DEFAULT_ADAPTER}: no trained adapter found — run `python -m train.sft` first "
                            "(it saves the bundled default model and its adapter), or pass --model DIR --adapter DIR")
        raise ChatError(f"{adapter}: no adapter_config.json (not a LoRA adapter folder)")
    named = adapter_base_model(adapter)  # a malformed adapter_config.json is an error, not "no base"
    if named and (Path(named).is_file() or (Path(named) / "config.json").is_file()):
        return Path(named), adapter
    if (DEFAULT_BASE / "config.json").is_file():
        return DEFAULT_BASE, adapter
    raise ChatError(f"{adapter}: its base model {named!r} is not here and {DEFAULT_BASE} is missing — "
                    "pass --model DIR (or run `python -m train.sft` first)")


def load_chat_model(model_path: Path, adapter_dir: Path | None, dtype: torch.dtype = torch.float32,
                    pack: bool = True):
    """(merged model in eval mode, tokenizer) from a base of any family (infer.models: an HF folder or a GGUF
    file, the tokenizer next to it or in it) and an optional PEFT adapter.

    With `pack` (CPU), linear weights are pre-packed for oneDNN (core.onednn): faster decoding, same
    numbers (bitwise in bf16); the model is then inference-only."""
    from infer.models import load_causal_lm
    from lora import load_adapter, merge_lora

    model, tokenizer = load_causal_lm(model_path, dtype=dtype)
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ChatError(f"{adapter_dir}: --adapter folder not found")
        load_adapter(model, adapter_dir)
        merge_lora(model)
    model.eval()
    if pack:
        from core.onednn import pack_linears
        pack_linears(model)
    return model, tokenizer


def load_memory_model(store_path: Path, memory_model: str | Path | None,
                      no_memory: bool) -> tuple[TextEncoder | None, str | None]:
    """(encoder or None, note): the memory model of `--memory-model`, else runs/sbert/best when present."""
    note = None
    encoder = None
    if not no_memory:
        folder = Path(memory_model) if memory_model is not None else TRAINED_DIR
        if folder.is_dir():
            encoder = load_memory_encoder(folder)
        elif memory_model is not None:
            raise ChatError(f"{folder}: --memory-model folder not found")
        else:
            note = (f"note: no memory model ({TRAINED_DIR} not found; run `python -m sbert.train` or pass "
                    f"--memory-model DIR): chatting without memory; new items are still saved to {store_path}")
    else:
        note = f"note: memory search off (--no-memory); new items are still saved to {store_path}"
    return encoder, note


def load_memory(store_path: Path, memory_model: str | Path | None, no_memory: bool,
                user: str = DEFAULT_USER) -> tuple[MemorySearch, str | None]:
    """(store, note). The store always loads (items are saved even without search); search needs an encoder.
    A `.sqlite` / `.db` path is the per-user database (chat.memory_db: `user`'s space), anything else a text or
    JSON file (chat.memory.MemoryStore)."""
    encoder, note = load_memory_model(store_path, memory_model, no_memory)
    if is_sqlite_path(store_path):
        return MemoryDB(store_path, encoder=encoder).user(user), note
    return MemoryStore.load(store_path, encoder=encoder, missing_ok=True), note


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ChatOptions:
    """`python -m chat` flags besides the sampling ones (those come from SamplingConfig)."""
    model: str | None = flag(None, kind="path", help=f"base model: an HF folder (GPT-NeoX or Gemma) or a Gemma "
                                                     f".gguf file (default: the base the adapter names, else "
                                                     f"{DEFAULT_BASE})")
    adapter: str | None = flag(None, kind="dir", help=f"LoRA adapter folder (default: {DEFAULT_ADAPTER} when "
                                                      "--model is not given)")
    memory_model: str | None = flag(None, kind="dir", help=f"sentence-transformers folder (default: {TRAINED_DIR} "
                                                           "if present)")
    memory_store: str = flag(str(DEFAULT_STORE), kind="output_file",
                             help="memory items: a text / .json file, or a .sqlite database of every user's items")
    user: str = flag(DEFAULT_USER, metavar="NAME",
                     help="the memory space in a .sqlite --memory-store (python -m chat.serve's `user`)")
    no_memory: bool = flag(False, help="do not search the memory (items are still saved)")
    once: str | None = flag(None, metavar="MESSAGE", help="answer one message, print it and exit (for scripts)")
    dtype: str = flag("fp32", choices=DTYPE_CHOICES, help="model weights dtype (bf16: half the memory, faster for "
                                                          "a 1.3B model where the CPU has native bf16; auto: "
                                                          "chosen by capability)")
    no_pack: bool = flag(False, help="keep plain nn.Linear layers (no oneDNN weight packing)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m chat", description="Chat with the LoRA-tuned Oh-LoRA model.")
    add_config_flags(p, ChatOptions)
    add_config_flags(p, SamplingConfig, exclude=("do_sample", "stop_strings"), group="sampling")
    return p


def _print_turn_notes(reply: ChatReply) -> None:
    if reply.memory is not None:
        print(f"  (memory: {reply.memory[0]}, cosine {reply.memory[1]:.2f})", file=sys.stderr)
    for item in reply.stored:
        print(f"  (remembered: {item})", file=sys.stderr)


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = config_from_args(ChatOptions, args)
    config = config_from_args(SamplingConfig, args)
    if opts.once is not None and not opts.once.strip():
        raise ChatError("--once: empty message")
    model_dir, adapter_dir = resolve_model_dirs(opts.model, opts.adapter)
    dtype_name, dtype_note = choose_dtype(opts.dtype, "cpu")
    if dtype_note:
        print(dtype_note, file=sys.stderr)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, tokenizer = load_chat_model(model_dir, adapter_dir, dtype, pack=not opts.no_pack)
    memory, note = load_memory(Path(opts.memory_store), opts.memory_model, opts.no_memory, opts.user)
    if note:
        print(note, file=sys.stderr)
    session = ChatSession(model, tokenizer, config, memory, use_memory_search=memory.encoder is not None)

    if opts.once is not None:
        reply = session.reply(opts.once)
        _print_turn_notes(reply)
        print(reply.answer)
        return 0

    print(f"model {model_dir}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
          " — type a message (Ctrl-D or 'exit' to quit)", file=sys.stderr)
    while True:
        try:
            message = input("나> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if message.strip().lower() in EXIT_WORDS:
            return 0
        if not message.strip():
            print("  (empty message — type something, or 'exit' to quit)", file=sys.stderr)
            continue
        print("오로라> ", end="", flush=True)
        try:
            reply = session.reply(message, stream=lambda piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:
            print("\n  (interrupted)", file=sys.stderr)
            continue
        print(flush=True)
        _print_turn_notes(reply)


if __name__ == "__main__":
    sys.exit(main())
