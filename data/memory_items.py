"""The `[key: value]` memory-item format: what the chat model writes into answers and the memory store keeps.

    "[오늘 일정: 친구랑 카페 방문]"  ->  parse_item -> ("오늘 일정", "친구랑 카페 방문")

The key has no brackets or colon; the value no brackets (it may hold a colon: `[시간: 10:30]`). Lives in data/
because the training data, the SFT quality check, the stream filter and the memory store all read this format.
"""
from __future__ import annotations

import re

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
