"""The first bytes of a GGUF file: enough to tell which model family reads it, without parsing the file.

The gguf package's reader parses every key and array up front (a 262k-piece vocabulary takes seconds); picking
a family needs only `general.architecture`, which writers (gguf's GGUFWriter, llama.cpp) put first.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING = 8


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def gguf_architecture(path: str | os.PathLike, max_keys: int = 64) -> str | None:
    """`general.architecture` of a GGUF file from its first metadata keys (writers put it first), without
    parsing the rest (a vocabulary takes seconds); None when it is not among them or the header is cut short."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                return None
            version = struct.unpack("<I", fh.read(4))[0]
            order = "<" if version < 0x10000 else ">"   # a big-endian file reads as a huge version
            _, n_kv = struct.unpack(order + "QQ", fh.read(16))

            def string() -> str:
                (n,) = struct.unpack(order + "Q", fh.read(8))
                return fh.read(n).decode("utf-8")

            for _ in range(min(n_kv, max_keys)):
                key = string()
                (kind,) = struct.unpack(order + "I", fh.read(4))
                if kind == _STRING:
                    value = string()
                    if key == "general.architecture":
                        return value
                elif kind in _SCALARS:
                    fh.seek(_SCALARS[kind], 1)
                else:  # an array before the architecture: not worth walking
                    return None
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None
