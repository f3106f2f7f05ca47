"""Memory per user in SQLite: what `python -m chat.serve` keeps (and `python -m chat --memory-store X.sqlite`).

    db = MemoryDB("runs/memory.sqlite", encoder=encoder)   # one file for every user
    mem = db.user("alice")                                 # alice's space: a MemorySearch (recall, remember, ...)
    mem.add("[좋아하는 음식: 떡볶이]"); mem.items; mem.remove("좋아하는 음식"); mem.clear()

Tables (schema version in `PRAGMA user_version`):

    items(id, user, key, value, updated)     UNIQUE(user, key): the same key replaces its value in place, as the
                                             text store does; listing order = id (first stored first)
    embeddings(encoder, text, vector)        unit item embeddings, keyed by the encoder's identity (its folder +
                                             weights stamp) and the item text: a restart encodes nothing again

Every query names its user, so one user never sees or changes another's items. Durability: WAL journal,
`synchronous=FULL`, one transaction per change (`add` is a single upsert: concurrent writers of the same item
store it once), so a process killed at any moment leaves the database with every committed change; it is
checked (`PRAGMA quick_check`) when opened. One connection per process, used under a lock (calls come from the
server's worker threads); other processes (a terminal chat on the same file) wait up to `busy_timeout`.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from chat.memory import MemorySearch, TextEncoder
from data.memory_items import MemoryFormatError, clean_text, format_item, parse_item

SCHEMA_VERSION = 1
MAX_USER_LENGTH = 128
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (user, key)
);
CREATE TABLE IF NOT EXISTS embeddings (
    encoder TEXT NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (encoder, text)
) WITHOUT ROWID;
"""


def is_sqlite_path(path: str | os.PathLike) -> bool:
    """Whether a --memory-store path names a database (by its suffix) rather than a text / JSON file."""
    return Path(path).suffix.lower() in SQLITE_SUFFIXES


def check_user(user: object) -> str:
    """A memory space name: a non-empty string of at most 128 characters without control characters. It is
    only ever a bound SQL parameter, never part of a path or a statement."""
    if not isinstance(user, str) or not user or len(user) > MAX_USER_LENGTH:
        raise MemoryFormatError(f"user must be a string of 1 to {MAX_USER_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise MemoryFormatError("user must not contain control characters")
    return user


class MemoryDB:
    """One SQLite file holding every user's items and the cached item embeddings."""

    def __init__(self, path: str | os.PathLike, *, encoder: TextEncoder | None = None,
                 threshold: float | None = None, max_cached_users: int = 1024):
        self.path = Path(path)
        if self.path.is_dir():
            raise MemoryFormatError(f"{self.path}: is a folder; the memory database is a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.encoder, self.threshold = encoder, threshold
        self.lock = threading.RLock()         # one connection, many threads; also guards the encoder's use
        self._users: OrderedDict[str, UserMemory] = OrderedDict()  # their in-memory embedding matrices
        self._max_cached_users = max_cached_users
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self.conn.execute("PRAGMA busy_timeout = 10000")
            mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self.conn.execute("PRAGMA synchronous = FULL")
            check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise MemoryFormatError(f"{self.path}: the memory database is damaged ({check})")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise MemoryFormatError(f"{self.path}: schema version {version} is newer than this program's "
                                        f"({SCHEMA_VERSION})")
            with self._transaction() as conn:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # embeddings of items no one holds any more (replaced or removed values) are dropped at start-up
                conn.execute("DELETE FROM embeddings WHERE text NOT IN "
                             "(SELECT '[' || key || ': ' || value || ']' FROM items)")
        except sqlite3.DatabaseError as e:   # "file is not a database", a locked or read-only file, ...
            raise MemoryFormatError(f"{self.path}: cannot open the memory database ({e})") from None
        if mode.lower() != "wal":
            raise MemoryFormatError(f"{self.path}: SQLite refused WAL mode (journal_mode {mode})")

    def _transaction(self):
        return _Transaction(self.conn)

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def __enter__(self) -> MemoryDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def user(self, name: str) -> UserMemory:
        """The memory space of `name` (a view; kept for reuse so its embedding matrix stays warm)."""
        name = check_user(name)
        with self.lock:
            view = self._users.pop(name, None) or UserMemory(self, name)
            self._users[name] = view
            while len(self._users) > self._max_cached_users:
                self._users.popitem(last=False)
            return view

    def users(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.conn.execute("SELECT DISTINCT user FROM items ORDER BY user")]

    def integrity(self) -> str:
        """`PRAGMA integrity_check`'s answer: "ok" for an intact database."""
        with self.lock:
            return self.conn.execute("PRAGMA integrity_check").fetchone()[0]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one change, all or nothing, writers queued."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


class UserMemory(MemorySearch):
    """One user's items in a MemoryDB, with the shared search (chat.memory.MemorySearch). Every change is its own
    committed transaction, so `flush()` has nothing to do."""

    def __init__(self, db: MemoryDB, user: str):
        super().__init__(encoder=db.encoder, threshold=db.threshold)
        self.db, self.user = db, user
        self.path = None

    @property
    def items(self) -> list[str]:
        with self.db.lock:
            rows = self.db.conn.execute("SELECT key, value FROM items WHERE user = ? ORDER BY id", (self.user,))
            return [format_item(k, v) for k, v in rows]

    def add(self, item: str) -> bool:
        """Store `[key: value]` (normalised); the same key replaces its value in place. True if anything changed."""
        key, value = parse_item(item)
        with self.db.lock, self.db._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO items (user, key, value, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, key) DO UPDATE SET value = excluded.value, updated = excluded.updated "
                "WHERE items.value != excluded.value", (self.user, key, value, time.time()))
            return cur.rowcount > 0

    def remove(self, key: str) -> bool:
        """Forget this user's item with this key. True if one was removed."""
        with self.db.lock, self.db._transaction() as conn:
            return conn.execute("DELETE FROM items WHERE user = ? AND key = ?",
                                (self.user, clean_text(key))).rowcount > 0

    def clear(self) -> int:
        """Forget all of this user's items; returns how many there were."""
        with self.db.lock, self.db._transaction() as conn:
            return conn.execute("DELETE FROM items WHERE user = ?", (self.user,)).rowcount

    # search under the database lock: the embedding cache and the encoder are shared by the server's threads
    def scores(self, message: str) -> list[tuple[str, float]]:
        with self.db.lock:
            return super().scores(message)

    def _load_vectors(self, source: str, texts: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(texts), 500):          # SQLite's bound-parameter limit
            chunk = texts[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for text, blob in self.db.conn.execute(
                    f"SELECT text, vector FROM embeddings WHERE encoder = ? AND text IN ({marks})", (source, *chunk)):
                found[text] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def _save_vectors(self, source: str, vectors: dict[str, np.ndarray]) -> None:
        with self.db._transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO embeddings (encoder, text, vector) VALUES (?, ?, ?)",
                             [(source, t, np.asarray(v, dtype=np.float32).tobytes()) for t, v in vectors.items()])

