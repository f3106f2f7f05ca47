"""Invariants of the bundled SFT data file `data/ohlora_sft.csv` (stdlib only, well under a second)."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

CSV_PATH = Path(__file__).resolve().parents[1] / "data" / "ohlora_sft.csv"

# A memory item: `[key: value]`, key without brackets/colons, value without brackets.
MEMORY_ITEM = re.compile(r"\[[^\[\]:]+: [^\[\]]+\]")
LEADING_MEMORY_ITEM = re.compile(r"^\[[^\[\]:]+: [^\[\]]+\] ")
TEMPLATE_MARKERS = ("(답변 종료)", "(답변 시작)", "### 답변:", "<|endoftext|>")
CATEGORIES = {"general", "small_talk", "persona", "feelings_support", "states_fact", "memory_in_front", "rude",
              "controversial", "beyond_companion", "special", "varied"}


@pytest.fixture(scope="module")
def raw_bytes() -> bytes:
    return CSV_PATH.read_bytes()


@pytest.fixture(scope="module")
def rows(raw_bytes: bytes) -> list[dict[str, str]]:
    text = raw_bytes.decode("utf-8")  # strict: raises on any invalid byte
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _split(rows: list[dict[str, str]], name: str) -> list[dict[str, str]]:
    return [r for r in rows if r["split"] == name]


def test_utf8_without_bom(raw_bytes: bytes) -> None:
    assert not raw_bytes.startswith(b"\xef\xbb\xbf"), "BOM would corrupt the first column name"
    raw_bytes.decode("utf-8")


def test_columns_exact(raw_bytes: bytes) -> None:
    header = next(csv.reader(io.StringIO(raw_bytes.decode("utf-8"), newline="")))
    assert header == ["split", "input_data", "output_data", "category"]


def test_split_values_and_counts(rows: list[dict[str, str]]) -> None:
    assert {r["split"] for r in rows} == {"train", "valid"}
    assert len(_split(rows, "train")) >= 950
    assert len(_split(rows, "valid")) >= 100
    # every row names its category (data/persona.md's categories; `general` = the first 320 rows' rest)
    assert {r["category"] for r in rows} <= CATEGORIES
    assert {r["category"] for r in _split(rows, "valid")} == CATEGORIES


def test_no_empty_cells(rows: list[dict[str, str]]) -> None:
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        for col in ("split", "input_data", "output_data"):
            value = r[col]
            assert value is not None and value.strip(), f"row {i}: empty {col}"
            assert value == value.strip(), f"row {i}: {col} has leading/trailing whitespace"
            assert "\n" not in value and "\r" not in value, f"row {i}: {col} spans several lines"


def test_no_duplicate_inputs_and_no_leak(rows: list[dict[str, str]]) -> None:
    inputs = [r["input_data"] for r in rows]
    assert len(inputs) == len(set(inputs))
    train = {r["input_data"] for r in _split(rows, "train")}
    valid = {r["input_data"] for r in _split(rows, "valid")}
    assert train & valid == set()


def test_no_template_text(rows: list[dict[str, str]]) -> None:
    for r in rows:
        for marker in TEMPLATE_MARKERS:
            assert marker not in r["input_data"] and marker not in r["output_data"], marker


def test_memory_prefix_share(rows: list[dict[str, str]]) -> None:
    for subset in (rows, _split(rows, "train")):
        share = sum(bool(LEADING_MEMORY_ITEM.match(r["input_data"])) for r in subset) / len(subset)
        assert 0.20 <= share <= 0.30, share
    # Validation rows also exercise the memory prefix.
    assert sum(bool(LEADING_MEMORY_ITEM.match(r["input_data"])) for r in _split(rows, "valid")) >= 5
    # A bracket in an input only ever appears as one well-formed leading item.
    for r in rows:
        if "[" in r["input_data"] or "]" in r["input_data"]:
            assert LEADING_MEMORY_ITEM.match(r["input_data"]), r["input_data"]
            assert len(MEMORY_ITEM.findall(r["input_data"])) == 1, r["input_data"]


def test_memory_items_to_store(rows: list[dict[str, str]]) -> None:
    with_item = [r["output_data"] for r in rows if MEMORY_ITEM.search(r["output_data"])]
    assert len(with_item) / len(rows) >= 0.05
    for out in with_item:
        items = MEMORY_ITEM.findall(out)
        assert len(items) == 1, out
        # The item opens or closes the answer, and there is an actual answer beside it.
        assert out.startswith(items[0] + " ") or out.endswith(" " + items[0]), out
        assert out.replace(items[0], "").strip(), out
    for r in rows:  # no stray brackets outside well-formed items
        assert MEMORY_ITEM.sub("", r["output_data"]).count("[") == 0, r["output_data"]


def test_answers_are_short(rows: list[dict[str, str]]) -> None:
    lengths = [len(MEMORY_ITEM.sub("", r["output_data"]).strip()) for r in rows]
    assert max(lengths) <= 80
    assert sum(n <= 60 for n in lengths) / len(lengths) >= 0.9
