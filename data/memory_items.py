"""The `[key: value]` memory-item format: what the chat model writes into answers and the memory store keeps.

    "[오늘 일정: 친구랑 카페 방문]"  ->  parse_item -> ("오늘 일정", "친구랑 카페 방문")

The key has no brackets or colon; the value no brackets (it may hold a colon: `[시간: 10:30]`). Lives in data/
because the training data, the SFT quality check, the stream filter and the memory store all read this format.
"""
from __future__ import annotations

import re
from typing import Callable

from core.errors import OhLoRAError

# `[key: value]`: the key has no brackets or colon, the value no brackets (it may hold a colon: `[시간: 10:30]`).
ITEM_PATTERN = re.compile(r"\[\s*([^\[\]:]+?)\s*:\s*([^\[\]]*?[^\[\]\s][^\[\]]*?)\s*\]")

class MemoryFormatError(OhLoRAError):
    """A store file or item that is not `[key: value]`: the message names the file/line or the item."""


def clean_text(text: str) -> str:
    return " ".join(text.split())


def parse_item(item: str) -> tuple[str, str]:
    """`[오늘 일정: 친구랑 카페 방문]` -> ('오늘 일정', '친구랑 카페 방문'); anything else raises MemoryFormatError."""
    match = ITEM_PATTERN.fullmatch(item.strip())
    if match is None:
        raise MemoryFormatError(f"not a memory item of the form [key: value]: {item!r}")
    return clean_text(match.group(1)), clean_text(match.group(2))


def format_item(key: str, value: str) -> str:
    return f"[{clean_text(key)}: {clean_text(value)}]"


def extract_memory_items(text: str) -> list[str]:
    """All `[key: value]` items in a text (e.g. an answer of the chat model), normalised, in order."""
    return [format_item(m.group(1), m.group(2)) for m in ITEM_PATTERN.finditer(text)]


def strip_memory_items(text: str) -> str:
    """The text without its `[key: value]` items, whitespace collapsed."""
    return clean_text(ITEM_PATTERN.sub(" ", text))


class ItemFilter:
    """Streams text with `[key: value]` items removed and whitespace collapsed, as `strip_memory_items` does.

    Text from a `[` on is held until its `]` shows whether it is an item (dropped) or plain text (shown);
    whitespace is held until a visible character follows, so the pieces concatenate to exactly
    `strip_memory_items(full_text)`."""

    _WORDS = re.compile(r"(\s+)")

    def __init__(self, write: Callable[[str], None]):
        self.write = write
        self.buf = ""
        self.started = False
        self.space = False

    def feed(self, piece: str) -> None:
        self.buf += piece
        self._drain(final=False)

    def close(self) -> None:
        self._drain(final=True)

    def _drain(self, final: bool) -> None:
        while self.buf:
            start = self.buf.find("[")
            if start != 0:                                   # plain text up to the next "[" (or all of it)
                cut = len(self.buf) if start < 0 else start
                self._text(self.buf[:cut])
                self.buf = self.buf[cut:]
                continue
            close, reopen = self.buf.find("]"), self.buf.find("[", 1)
            if reopen >= 0 and (close < 0 or reopen < close):  # "[" ... "[": the first one opens no item
                self._text(self.buf[:reopen])
                self.buf = self.buf[reopen:]
            elif close >= 0:
                candidate, self.buf = self.buf[:close + 1], self.buf[close + 1:]
                self._text(" " if ITEM_PATTERN.fullmatch(candidate) else candidate)
            elif final:
                self._text(self.buf)
                self.buf = ""
            else:
                return                                       # wait for "]"

    def _text(self, text: str) -> None:
        for part in self._WORDS.split(text):
            if not part:
                continue
            if part.isspace():
                self.space = self.started
                continue
            self.write((" " if self.space else "") + part)
            self.started, self.space = True, False
