"""chat.memory: [key: value] parsing, the store (dedupe/replace, files), the 0.6 threshold, prompt format, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from chat.memory import MemoryStore, main
from data.memory_items import MemoryFormatError, extract_memory_items, parse_item, strip_memory_items
from tests.sbert_fixtures import minilm_dir_path, minilm_encoder  # noqa: F401 (fixtures)

# A stub encoder with known geometry: each text is a 2-d direction (degrees), so every cosine is a known number.
# Items: schedule at 0°, food at 90°, hobby at 180°.
ITEMS = ["[오늘 일정: 친구랑 카페 방문]", "[좋아하는 음식: 떡볶이]", "[취미: 등산]"]
ANGLES = {ITEMS[0]: 0.0, ITEMS[1]: 90.0, ITEMS[2]: 180.0,
          "오늘 뭐 해?": 30.0,   # schedule cos 30° = 0.8660, food 0.5
          "배고파": 55.0,        # food cos 35° = 0.8192, schedule cos 55° = 0.5736
          "먼 얘기": 234.0}      # hobby cos 54° = 0.5878 (< 0.6), the others negative


class StubEncoder:
    def __init__(self, angles: dict[str, float]):
        self.angles, self.calls = angles, []

    def encode(self, texts, batch_size: int = 32):
        self.calls.append(list(texts))
        rad = np.deg2rad([self.angles[t] for t in texts])
        return np.stack([np.cos(rad), np.sin(rad)], axis=1) * 3.0  # not unit length: the store must normalise


def test_parse_extract_strip():
    assert parse_item(" [ 오늘  일정 :  친구랑 카페 방문 ] ") == ("오늘 일정", "친구랑 카페 방문")
    assert parse_item("[시간: 10:30 회의]") == ("시간", "10:30 회의")
    for bad in ["오늘 일정: 카페", "[오늘 일정]", "[: 값]", "[키: ]", "[a: b] c"]:
        with pytest.raises(MemoryFormatError):
            parse_item(bad)
    answer = "좋아! [오늘 일정: 친구랑  카페 방문] 재밌게 놀자 [좋아하는 음식:떡볶이] (답변 종료)"
    assert extract_memory_items(answer) == ["[오늘 일정: 친구랑 카페 방문]", "[좋아하는 음식: 떡볶이]"]
    assert strip_memory_items(answer) == "좋아! 재밌게 놀자 (답변 종료)"
    assert extract_memory_items("그냥 대화 [괄호] 일 뿐") == []
    assert strip_memory_items("그냥 대화 [괄호] 일 뿐") == "그냥 대화 [괄호] 일 뿐"


def test_threshold_prompt_and_empty_store():
    store = MemoryStore(ITEMS, encoder=StubEncoder(ANGLES))
    assert store.best_memory("오늘 뭐 해?") == (ITEMS[0], pytest.approx(0.866025, abs=1e-6))
    assert store.build_prompt("오늘 뭐 해?") == "[오늘 일정: 친구랑 카페 방문] 오늘 뭐 해?"
    assert store.best_memory("배고파") == (ITEMS[1], pytest.approx(0.819152, abs=1e-6))
    assert store.build_prompt("배고파") == "[좋아하는 음식: 떡볶이] 배고파"
    ranked = store.scores("먼 얘기")
    assert [i for i, _ in ranked] == [ITEMS[2], ITEMS[0], ITEMS[1]]
    assert [s for _, s in ranked] == pytest.approx([0.587785, -0.587785, -0.809017], abs=1e-6)
    assert store.best_memory("먼 얘기") is None  # best is below 0.6
    assert store.build_prompt("먼 얘기") == "먼 얘기"
    store.threshold = 0.5
    assert store.build_prompt("먼 얘기") == "[취미: 등산] 먼 얘기"
    empty = MemoryStore(encoder=StubEncoder(ANGLES))
    assert empty.best_memory("오늘 뭐 해?") is None and empty.scores("오늘 뭐 해?") == []
    assert empty.build_prompt("오늘 뭐 해?") == "오늘 뭐 해?"


def test_exact_threshold_is_inclusive_and_cache_follows_items():
    enc = StubEncoder({"[a: b]": 0.0, "[c: d]": 90.0, "q": float(np.rad2deg(np.arccos(0.6)))})
    store = MemoryStore(["[a: b]"], encoder=enc)
    score = store.scores("q")[0][1]
    assert score == pytest.approx(0.6, abs=1e-6)
    store.threshold = score  # >= : a score equal to the threshold is used
    assert store.best_memory("q") == ("[a: b]", score)
    store.threshold = score + 1e-6
    assert store.best_memory("q") is None
    n_item_encodes = sum(1 for c in enc.calls if c != ["q"])
    store.best_memory("q")
    assert sum(1 for c in enc.calls if c != ["q"]) == n_item_encodes  # cached
    store.add("[c: d]")
    store.best_memory("q")
    assert enc.calls[-2] == ["[c: d]"]  # only the new item is encoded after the change


def test_add_dedupe_replace_remove():
    store = MemoryStore()
    assert store.add("[오늘 일정: 카페]") and not store.add("[ 오늘 일정 :카페 ]")  # identical after normalising
    assert store.add("[좋아하는 음식: 떡볶이]")
    assert store.add("[오늘 일정: 도서관]")  # same key: the value is replaced in place
    assert store.items == ["[오늘 일정: 도서관]", "[좋아하는 음식: 떡볶이]"] and len(store) == 2
    assert store.remove("오늘 일정") and not store.remove("오늘 일정")
    assert store.items == ["[좋아하는 음식: 떡볶이]"]
    with pytest.raises(MemoryFormatError):
        store.add("no brackets")


@pytest.mark.parametrize("name", ["memory.txt", "memory.json"])
def test_save_load_round_trip(tmp_path, name):
    path = tmp_path / "sub" / name
    store = MemoryStore(["[오늘 일정: 카페]", "[취미: 등산]"], path=path)
    store.save()
    assert MemoryStore.load(path).items == ["[오늘 일정: 카페]", "[취미: 등산]"]
    if name.endswith(".json"):
        assert json.loads(path.read_text(encoding="utf-8")) == ["[오늘 일정: 카페]", "[취미: 등산]"]
    else:
        assert path.read_text(encoding="utf-8") == "[오늘 일정: 카페]\n[취미: 등산]\n"
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temp file left behind
    assert MemoryStore.load(tmp_path / "missing.txt", missing_ok=True).items == []
    with pytest.raises(FileNotFoundError):
        MemoryStore.load(tmp_path / "missing.txt")


def test_bad_store_files_name_the_line(tmp_path):
    bad = tmp_path / "m.txt"
    bad.write_text("# my memory\n[오늘 일정: 카페]\n\n오늘 일정 없음\n", encoding="utf-8")
    with pytest.raises(MemoryFormatError, match=r"m\.txt: line 4 "):
        MemoryStore.load(bad)
    bad_json = tmp_path / "m.json"
    bad_json.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(MemoryFormatError, match="JSON list"):
        MemoryStore.load(bad_json)


def test_real_minilm_threshold_sides(minilm_encoder):
    """With real all-MiniLM-L6-v2 weights: a clearly matching item scores above 0.6, an unrelated one below."""
    store = MemoryStore(["[favorite food: pizza]", "[hobby: climbing mountains]", "[오늘 일정: 친구랑 카페 방문]"],
                        encoder=minilm_encoder)
    item, score = store.best_memory("What is your favorite food? Do you like pizza?")
    assert item == "[favorite food: pizza]" and 0.65 < score < 0.85  # measured 0.736
    assert store.build_prompt("오늘 친구랑 카페 가?") == "[오늘 일정: 친구랑 카페 방문] 오늘 친구랑 카페 가?"  # 0.761
    ranked = store.scores("Explain quantum chromodynamics to me.")
    assert ranked[0][1] < 0.3  # measured 0.11
    assert store.best_memory("Explain quantum chromodynamics to me.") is None


def test_cli(tmp_path, capsys, minilm_dir_path):
    store = tmp_path / "m.txt"
    store.write_text("[favorite food: pizza]\n[hobby: climbing mountains]\n", encoding="utf-8")
    rc = main(["--query", "Do you like pizza? What food do you like?", "--memory-store", str(store),
               "--model", str(minilm_dir_path), "--top", "1"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 2
    assert out[0].startswith("* 0.") and out[0].endswith("[favorite food: pizza]")
    assert out[1] == "prompt: [favorite food: pizza] Do you like pizza? What food do you like?"
    store.write_text("broken line\n", encoding="utf-8")
    assert main(["--query", "x", "--memory-store", str(store), "--model", str(minilm_dir_path)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_item_embeddings_cached_until_an_item_or_the_model_changes():
    """A query costs one encode of the message; items are encoded once, again only when they or the model change."""
    angles = {f"[k{i}: v]": float(i) for i in range(1000)} | {"[k0: new]": 45.0, "q": 0.5}
    enc = StubEncoder(angles)
    store = MemoryStore([f"[k{i}: v]" for i in range(1000)], encoder=enc)
    for _ in range(3):
        assert store.scores("q")[0][0] in ("[k0: v]", "[k1: v]")
    assert [len(c) for c in enc.calls] == [1000, 1, 1, 1]          # items once, then one query encode each
    assert store.add("[k0: new]")                                  # a replaced value: only it is encoded
    store.scores("q")
    assert enc.calls[-2:] == [["[k0: new]"], ["q"]]
    store.remove("k5")
    store.scores("q")
    assert enc.calls[-1] == ["q"]                                  # removing needs no encode
    other = StubEncoder(angles)                                    # another model: everything afresh
    store.encoder = other
    store.scores("q")
    assert [len(c) for c in other.calls] == [999, 1]
    other.source = "reloaded with changed weights"                 # the same object, new weights stamp
    store.scores("q")
    assert [len(c) for c in other.calls] == [999, 1, 999, 1]


def test_store_applies_the_models_prompts(tmp_path):
    """e5-style prompts live in the model folder and are applied inside the encoder: passages for items,
    queries for messages; a folder without prompts (MiniLM) gets the plain texts."""
    from bert.model import SentenceEncoder
    from tests.sbert_fixtures import save_tiny_hf_encoder, save_tiny_st

    save_tiny_st(tmp_path / "st", save_tiny_hf_encoder(tmp_path / "hf"), normalize=True)
    plain = SentenceEncoder.load(tmp_path / "st")
    assert plain.prompt("query") == plain.prompt("passage") == ""   # ST 6.x writes empty prompts
    prompted = SentenceEncoder.load(tmp_path / "st")
    prompted.prompts = {"query": "query: ", "passage": "passage: "}
    prompted.save(tmp_path / "e5like")
    model = SentenceEncoder.load(tmp_path / "e5like")               # a saved (trained) model keeps them
    assert model.prompts == {"query": "query: ", "passage": "passage: "}
    for enc, pre_q, pre_p in ((model, "query: ", "passage: "), (plain, "", "")):
        seen = []
        encode = enc.tokenizer.encode
        enc.tokenizer.encode = lambda texts, _e=encode: (seen.append(list(texts)), _e(texts))[1]
        store = MemoryStore(["[취미: 등산]", "[오늘 일정: 카페]"], encoder=enc)
        ranked = store.scores("오늘 뭐 해?")
        assert seen == [[pre_p + "[취미: 등산]", pre_p + "[오늘 일정: 카페]"], [pre_q + "오늘 뭐 해?"]]
        want_q = enc.encode([pre_q + "오늘 뭐 해?"])[0]
        want_p = enc.encode([pre_p + t for t, _ in ranked])
        assert [s for _, s in ranked] == pytest.approx(list(want_p @ want_q), abs=1e-5)
