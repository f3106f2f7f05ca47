"""Reading text files (data, memory stores) and the small JSON files of model, adapter and tokenizer folders,
with one-line errors naming the file (and the line of a bad byte)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_text(path: str | os.PathLike, error: type[Exception], *, bom: bool = False) -> str:
    """The UTF-8 text of `path` (`bom`: a leading byte-order mark dropped, as Excel writes CSVs);
    `error(f"{path}:{line}: not valid UTF-8 (byte N)")` when it is not. A missing file is the caller's to report."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None


def read_json(path: str | os.PathLike, error: type[Exception], *, expect: type | None = dict) -> Any:
    """The JSON value in `path`; `error(f"{path}: ...")` when it is not UTF-8 JSON or (with `expect`) not of that
    type. A missing file is the caller's to report (each says what the folder should have held)."""
    path = Path(path)
    try:
        value = json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
    if expect is not None and not isinstance(value, expect):
        kind = "an object" if expect is dict else f"a {expect.__name__}"
        raise error(f"{path}: expected {kind} in JSON, got {type(value).__name__}")
    return value


def config_json_path(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/config.json` for a model folder; FileNotFoundError naming it when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    return path
