"""chat.memory_db: the per-user SQLite memory: isolation, replace-by-key, one row per item under concurrent writers,
the embedding cache across restarts, damaged files, and the shared search (same ranking as the text store)."""
from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from chat.memory import MemoryStore
from chat.memory_db import MemoryDB, check_user, is_sqlite_path
from data.memory_items import MemoryFormatError


class AngleEncoder:
    """Each text is a 2-d direction: known cosines. Counts the passage texts it encodes."""
    source = "angle-encoder-v1"

    def __init__(self, angles):
        self.angles, self.encoded = angles, []

    def encode(self, texts, batch_size=32):
        self.encoded.extend(texts)
        rad = np.deg2rad([self.angles[t] for t in texts])
        return np.stack([np.cos(rad), np.sin(rad)], axis=1) * 2.0


ANGLES = {"[오늘 일정: 카페]": 0.0, "[음식: 떡볶이]": 90.0, "[취미: 등산]": 180.0, "오늘 뭐 해?": 30.0, "배고파": 60.0}


def test_users_are_isolated_and_keys_replace(tmp_path):
    with MemoryDB(tmp_path / "m.sqlite") as db:
        a, b = db.user("alice"), db.user("bob")
        assert a.add("[음식: 떡볶이]") and not a.add("[ 음식 :떡볶이 ]")       # identical after normalising
        assert b.add("[음식: 피자]")
        assert a.add("[음식: 김밥]")                                         # same key: replaced in place
        assert a.add("[취미: 등산]")
        assert a.items == ["[음식: 김밥]", "[취미: 등산]"] and b.items == ["[음식: 피자]"]
        assert not b.remove("취미") and a.items == ["[음식: 김밥]", "[취미: 등산]"]
        assert b.clear() == 1 and b.items == [] and len(a) == 2
        assert a.remove("음식") and a.items == ["[취미: 등산]"]
        assert db.users() == ["alice"]
        with pytest.raises(MemoryFormatError):
            a.add("no brackets")
    with MemoryDB(tmp_path / "m.sqlite") as db:                              # reopened: all still there
        assert db.user("alice").items == ["[취미: 등산]"] and db.integrity() == "ok"


def test_check_user_and_paths():
    assert check_user("웹-사용자 1") == "웹-사용자 1"
    for bad in ("", "x" * 129, None, 3, "a\nb", "a\x00"):
        with pytest.raises(MemoryFormatError):
            check_user(bad)
    assert is_sqlite_path("runs/memory.sqlite") and is_sqlite_path("m.DB") and not is_sqlite_path("memory.txt")


def test_search_equals_the_text_store_and_embeddings_survive_a_restart(tmp_path):
    enc = AngleEncoder(ANGLES)
    items = ["[오늘 일정: 카페]", "[음식: 떡볶이]", "[취미: 등산]"]
    with MemoryDB(tmp_path / "m.sqlite", encoder=enc) as db:
        mem = db.user("u")
        for item in items:
            mem.add(item)
        text_store = MemoryStore(items, encoder=AngleEncoder(ANGLES))
        for q in ("오늘 뭐 해?", "배고파"):
            ours, theirs = mem.scores(q), text_store.scores(q)
            assert [i for i, _ in ours] == [i for i, _ in theirs]
            assert [c for _, c in ours] == pytest.approx([c for _, c in theirs], abs=1e-6)
        assert mem.recall("오늘 뭐 해?") == ("[오늘 일정: 카페] 오늘 뭐 해?",
                                         ("[오늘 일정: 카페]", pytest.approx(0.8660254)))
        assert mem.recall("배고파")[1][0] == "[음식: 떡볶이]"
        assert sorted(t for t in enc.encoded if t.startswith("[")) == sorted(items)   # each item encoded once
    enc2 = AngleEncoder(ANGLES)
    with MemoryDB(tmp_path / "m.sqlite", encoder=enc2) as db:                    # a restart: read, not encoded
        assert db.user("u").best_memory("오늘 뭐 해?")[0] == "[오늘 일정: 카페]"
        assert enc2.encoded == ["오늘 뭐 해?"]
        rows = db.conn.execute("SELECT COUNT(*) FROM embeddings WHERE encoder = ?", (enc2.source,)).fetchone()[0]
        assert rows == 3
        db.user("u").add("[취미: 독서]")                                           # replaced value
    with MemoryDB(tmp_path / "m.sqlite", encoder=AngleEncoder(ANGLES)) as db:     # its old embedding is dropped
        texts = {r[0] for r in db.conn.execute("SELECT text FROM embeddings")}
        assert texts == {"[오늘 일정: 카페]", "[음식: 떡볶이]"}


def test_concurrent_writers_store_an_item_once(tmp_path):
    """Threads of one process and a second connection (another process's view) race to add the same items."""
    with MemoryDB(tmp_path / "m.sqlite") as db, MemoryDB(tmp_path / "m.sqlite") as other:
        changed = []
        lock = threading.Lock()

        def writer(target, t):
            for i in range(40):
                ok = target.user("shared").add(f"[k{i}: v{i}]")
                with lock:
                    changed.append(ok)

        threads = [threading.Thread(target=writer, args=(db if t % 2 else other, t)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(changed) == 40                                   # exactly one writer stored each item
        assert db.user("shared").items == [f"[k{i}: v{i}]" for i in range(40)]


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(MemoryFormatError, match=r"junk\.sqlite: cannot open the memory database"):
        MemoryDB(tmp_path / "junk.sqlite")
    with pytest.raises(MemoryFormatError, match="is a folder"):
        MemoryDB(tmp_path)
    conn = sqlite3.connect(tmp_path / "future.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(MemoryFormatError, match="newer"):
        MemoryDB(tmp_path / "future.sqlite")
