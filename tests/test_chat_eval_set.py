"""The held-apart evaluation set `data/eval/chat_eval.jsonl` (data/eval/README.md): schema, counts, keys and facts
that exist in data/persona.md, no overlap with the training data, and the frozen sha256. Well under a second."""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from data.memory_items import parse_item
from data.memory_pairs import SYNONYM_GROUPS

ROOT = Path(__file__).resolve().parents[1]
EVAL_PATH = ROOT / "data" / "eval" / "chat_eval.jsonl"
README_PATH = ROOT / "data" / "eval" / "README.md"
PERSONA_PATH = ROOT / "data" / "persona.md"
DATA_DIR = ROOT / "data"  # every CSV there with an `input_data` column is training data (ohlora_sft.csv today)

MIN_COUNTS = {"small_talk": 30, "persona": 20, "feelings_support": 25, "states_fact": 25, "memory_in_front": 25,
              "rude": 15, "controversial": 10, "beyond_companion": 10}
EXTRA_FIELDS = {"persona": {"persona_fact": str, "expect": list},
                "states_fact": {"item_key": str, "item_value_words": list},
                "memory_in_front": {"item": str, "use_words": list},
                "rude": {"cues": list}, "controversial": {"cues": list}, "beyond_companion": {"cues": list}}
BASE_FIELDS = {"id": str, "category": str, "prompt": str, "must": str}
NEAR_EQUAL = 0.8  # difflib ratio of normalised messages at or above which a prompt counts as a training row's twin
LEADING_ITEM = re.compile(r"^\s*\[[^\[\]]*\]\s*")


def normalise(text: str) -> str:
    """Case-, width-, whitespace- and punctuation-blind form of a message (its leading memory item dropped)."""
    text = LEADING_ITEM.sub("", unicodedata.normalize("NFKC", text).lower())
    return re.sub(r"[\W_]+", "", text)


def persona_tables(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(fact key -> accepted words, memory key -> also-accepted keys) from data/persona.md's two tables."""
    facts_part = text.split("## Facts", 1)[1].split("\n## ", 1)[0]
    keys_part = text.split("### Keys", 1)[1]
    facts = {m.group(1): [w.strip() for w in m.group(2).split(",") if w.strip()]
             for m in re.finditer(r"^\| `([a-z_]+)` \|[^|]*\| ([^|]*) \|", facts_part, re.M)}
    keys = {m.group(1): [k.strip() for k in m.group(2).split(",") if k.strip()]
            for m in re.finditer(r"^\| `([^`]+)` \|([^|]*)\|", keys_part, re.M)}
    return facts, keys


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = EVAL_PATH.read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def persona() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    return persona_tables(PERSONA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def training_messages() -> list[str]:
    messages = []
    for path in sorted(DATA_DIR.glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if "input_data" in (reader.fieldnames or []):
                messages += [r["input_data"] for r in reader]
    assert len(messages) >= 320, "data/ohlora_sft.csv is read"
    return messages


def test_persona_tables_parse_and_agree_with_the_memory_synonyms(persona) -> None:
    facts, keys = persona
    assert {"name", "mbti", "birthday", "age", "school"} <= facts.keys()
    assert all(facts.values()), "every fact lists accepted words"
    assert len(keys) >= 14
    groups = {key: set(group) for group in SYNONYM_GROUPS for key in group}
    for key, also in keys.items():  # a key and its "also accepted" keys are exactly one synonym group
        assert {key, *also} == groups.get(key, {key}), key


def test_schema(rows) -> None:
    for r in rows:
        fields = {**BASE_FIELDS, **EXTRA_FIELDS.get(r.get("category"), {})}
        assert set(r) == set(fields), r.get("id")
        for name, kind in fields.items():
            value = r[name]
            assert isinstance(value, kind) and value, (r["id"], name)
            if kind is list:
                assert all(isinstance(w, str) and w.strip() for w in value), (r["id"], name)
            else:
                assert value == value.strip() and "\n" not in value, (r["id"], name)
        assert re.fullmatch(rf"{r['category']}-\d{{3}}", r["id"]), r["id"]
        assert re.search(r"[가-힣]", r["prompt"]), r["id"]


def test_counts_and_unique_ids(rows) -> None:
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(MIN_COUNTS)
    for category, minimum in MIN_COUNTS.items():
        assert counts[category] >= minimum, (category, counts[category])
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    prompts = [normalise(r["prompt"]) for r in rows if r["category"] != "memory_in_front"]
    assert len(prompts) == len(set(prompts)), "two prompts say the same thing"


def test_items_are_well_formed_and_use_persona_keys(rows, persona) -> None:
    facts, keys = persona
    accepted_keys = set(keys) | {k for also in keys.values() for k in also}
    for r in rows:
        if r["category"] == "memory_in_front":
            key, value = parse_item(r["item"])
            assert r["prompt"].startswith(r["item"] + " ") and len(r["prompt"]) > len(r["item"]) + 1, r["id"]
            assert key in accepted_keys, (r["id"], key)
            message = r["prompt"][len(r["item"]):]
            assert "[" not in message and "]" not in message, r["id"]
        else:
            assert "[" not in r["prompt"] and "]" not in r["prompt"], r["id"]
        if r["category"] == "states_fact":
            assert r["item_key"] in keys, (r["id"], r["item_key"])  # a key she writes
            parse_item(f"[{r['item_key']}: {r['item_value_words'][0]}]")
        if r["category"] == "persona":
            assert r["persona_fact"] in facts, (r["id"], r["persona_fact"])
            assert set(r["expect"]) <= set(facts[r["persona_fact"]]), r["id"]


def test_no_prompt_repeats_a_training_message(rows, training_messages) -> None:
    train = [normalise(t) for t in training_messages]
    matcher = difflib.SequenceMatcher(autojunk=False)
    for r in rows:
        prompt = normalise(r["prompt"])
        matcher.set_seq2(prompt)
        for text, raw in zip(train, training_messages):
            assert prompt != text and prompt not in text, (r["id"], raw)
            matcher.set_seq1(text)
            if matcher.real_quick_ratio() >= NEAR_EQUAL and matcher.quick_ratio() >= NEAR_EQUAL:
                assert matcher.ratio() < NEAR_EQUAL, (r["id"], raw)


def test_frozen_sha256_matches_the_readme() -> None:
    stated = re.findall(r"sha256 of `chat_eval\.jsonl`: `([0-9a-f]{64})`", README_PATH.read_text(encoding="utf-8"))
    assert stated, "data/eval/README.md states the file's sha256"
    assert stated[0] == hashlib.sha256(EVAL_PATH.read_bytes()).hexdigest(), (
        "chat_eval.jsonl changed: the set is frozen (data/eval/README.md says how to add a new version)")
