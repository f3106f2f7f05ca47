"""The chatbot's memory: stored `[key: value]` items, the one most similar to the user's message is prepended.

    best = argmax_i cos(E_passage(item_i), E_query(message))
    prompt = f"{item_best} {message}" if cos >= t else message

t is the threshold calibrated for the model and saved in its folder (ohlora_memory.json, written by
`python -m sbert.train`), else the original's 0.6; an explicit `threshold=` / `--threshold` wins. The message
is encoded as a query and the items as passages (e5's `query: ` / `passage: ` prefixes, applied by the encoder
from its folder's config; MiniLM has none). Item embeddings are cached per item text and model, so a query
costs one encode.

e.g. `[오늘 일정: 친구랑 카페 방문] 오늘 뭐 해?`. The search (`MemorySearch`: threshold, embedding cache,
ranking, recall, storing an answer's items) is shared by every store: `MemoryStore` here (a list, or a file) and
`chat.memory_db.UserMemory` (one user's items in the server's SQLite database). A `MemoryStore` file is a text
file with one `[key: value]` item per line (like the original's memory file; blank lines and lines starting with
`#` are skipped) or a JSON list of such strings (a `.json` file). Keys are unique: adding an item whose key is
already stored replaces the old value (the newest fact wins, e.g. a new `[오늘 일정: …]`), an identical item is
ignored.

CLI: `python -m chat.memory --query "오늘 뭐 해?" [--model DIR] [--memory-store FILE] [--top K] [--threshold T]`.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bert.bases import TRAINED_DIR, default_model_dir
from core.atomic import atomic_write_text
from core.cli import COSINE, COUNT, Parser, add_config_flags, config_from_args, flag, run_cli
from core.jsonio import read_text
from data.memory_items import MemoryFormatError, clean_text, extract_memory_items, format_item, parse_item

DEFAULT_THRESHOLD = 0.6
EXAMPLE_ITEMS = ["[오늘 일정: 친구랑 카페 방문]", "[좋아하는 음식: 떡볶이]", "[좋아하는 가수: 아이유]",
                 "[오늘 날씨: 하루 종일 비]", "[취미: 주말마다 등산]"]


class TextEncoder(Protocol):
    """`encode(texts) -> (N, H)`; a SentenceEncoder also has encode_query / encode_passage (its prompts),
    `memory_threshold` (its calibrated threshold or None) and `source` (folder + weights stamp)."""
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray: ...


def encode_as(encoder: TextEncoder, texts: list[str], role: str) -> np.ndarray:
    """(N, H) float32 embeddings of `texts` as `role` ("query" = a user message, "passage" = a memory item):
    through `encode_<role>` when the encoder has it (its stored prompt), else plain `encode`."""
    fn = getattr(encoder, f"encode_{role}", None)
    return np.asarray(fn(texts) if fn is not None else encoder.encode(texts), dtype=np.float32)


def encoder_identity(encoder: TextEncoder) -> tuple[int, str | None]:
    """What the item cache is keyed by: the encoder object and the folder + weights stamp it was loaded from."""
    return id(encoder), getattr(encoder, "source", None)


class MemorySearch:
    """Similarity search over stored items: the threshold, the embedding cache and the ranking, shared by every
    store (the text file `MemoryStore`, the per-user SQLite `chat.memory_db.UserMemory`). A store provides
    `items`, `add(item) -> changed`, `remove(key) -> changed`, and may persist item embeddings through
    `_load_vectors` / `_save_vectors` (keyed by the encoder's `source` and the item text).

    `encoder` is a SentenceEncoder (or anything with `encode(texts)`); when None, the default model
    (`default_model_dir()`) is loaded on first use."""

    def __init__(self, *, encoder: TextEncoder | None = None, threshold: float | None = None):
        self.encoder = encoder
        self.threshold = threshold  # None: the model's calibrated threshold, else DEFAULT_THRESHOLD
        self._vectors: dict[str, np.ndarray] = {}      # item text -> unit embedding (H,), for _vectors_of
        self._vectors_of: tuple[int, str | None] | None = None  # encoder_identity the cache belongs to
        self._matrix: tuple[tuple, np.ndarray] | None = None    # ((identity, items), (N, H) stacked rows)

    @property
    def threshold(self) -> float:
        """The explicit threshold, else the encoder's calibrated one (saved with the model), else 0.6."""
        if self._threshold is not None:
            return self._threshold
        saved = getattr(self.encoder, "memory_threshold", None) if self.encoder is not None else None
        return float(saved) if saved is not None else DEFAULT_THRESHOLD

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = None if value is None else float(value)

    # ---- what a store provides --------------------------------------------------------------------------------
    @property
    def items(self) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def flush(self) -> None:
        """Make the changes so far durable (a file store writes its file; a database commits per change)."""

    def _load_vectors(self, source: str, texts: list[str]) -> dict[str, np.ndarray]:
        """Unit embeddings of `texts` by the encoder `source` kept from an earlier run (none by default)."""
        return {}

    def _save_vectors(self, source: str, vectors: dict[str, np.ndarray]) -> None:
        """Keep freshly computed unit embeddings for later runs (nothing by default)."""

    # ---- search -----------------------------------------------------------------------------------------------
    def _get_encoder(self) -> TextEncoder:
        if self.encoder is None:
            from bert.model import SentenceEncoder

            folder, note = default_model_dir()
            if note:
                print(note, file=sys.stderr)
            self.encoder = SentenceEncoder.load(folder)
        return self.encoder

    def _item_vectors(self, encoder: TextEncoder, items: list[str]) -> np.ndarray:
        """Unit-length item embeddings (N, H): only items not embedded yet by this model are encoded (one call);
        a different encoder (or one loaded from changed weights) starts the cache afresh."""
        identity = encoder_identity(encoder)
        stamp = (identity, tuple(items))
        if self._matrix is not None and self._matrix[0] == stamp:  # nothing changed: no encode, no re-stack
            return self._matrix[1]
        if self._vectors_of != identity:
            self._vectors, self._vectors_of = {}, identity
        new = [t for t in items if t not in self._vectors]
        source = identity[1]
        if new and source is not None:                             # a persistent cache needs a stable identity
            self._vectors.update(self._load_vectors(source, new))
            new = [t for t in new if t not in self._vectors]
        if new:
            fresh = dict(zip(new, _unit_rows(encode_as(encoder, new, "passage"))))
            self._vectors.update(fresh)
            if source is not None:
                self._save_vectors(source, fresh)
        if len(self._vectors) > 2 * len(items) + 16:  # forget replaced / removed items now and then
            self._vectors = {t: self._vectors[t] for t in items}
        matrix = np.stack([self._vectors[t] for t in items]).astype(np.float32)  # (N, H)
        self._matrix = (stamp, matrix)
        return matrix

    def scores(self, message: str) -> list[tuple[str, float]]:
        """Every item with its cosine similarity to the message, most similar first (one encode per call)."""
        items = self.items
        if not items:
            return []
        encoder = self._get_encoder()
        vectors = self._item_vectors(encoder, items)  # (N, H)
        query = _unit_rows(encode_as(encoder, [message], "query"))[0]  # (H,)
        sims = vectors @ query  # (N,)
        order = np.argsort(-sims, kind="stable")
        return [(items[i], float(sims[i])) for i in order]

    def best_memory(self, message: str) -> tuple[str, float] | None:
        """(item, cosine) of the most similar item if its cosine >= threshold, else None (also for an empty store)."""
        ranked = self.scores(message)
        if ranked and ranked[0][1] >= self.threshold:
            return ranked[0]
        return None

    def recall(self, message: str) -> tuple[str, tuple[str, float] | None]:
        """(text, best): `"{item} {message}"` with the best item (the original's prompt format) and that
        (item, cosine), or the message unchanged and None."""
        best = self.best_memory(message)
        return (f"{best[0]} {message}" if best else message), best

    def build_prompt(self, message: str) -> str:
        return self.recall(message)[0]

    def remember(self, answer: str) -> list[str]:
        """Store the `[key: value]` items of a model answer; returns those that changed the store (then flushed)."""
        stored = [item for item in extract_memory_items(answer) if self.add(item)]
        if stored:
            self.flush()
        return stored


class MemoryStore(MemorySearch):
    """Memory items in a list, optionally backed by a text / JSON file (`load`, `save`), + similarity search."""

    def __init__(self, items: list[str] | None = None, *, path: str | os.PathLike | None = None,
                 encoder: TextEncoder | None = None, threshold: float | None = None):
        super().__init__(encoder=encoder, threshold=threshold)
        self.path = Path(path) if path is not None else None
        self._items: list[str] = []
        for item in items or []:
            self.add(item)

    # ---- file I/O ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, encoder: TextEncoder | None = None,
             threshold: float | None = None, missing_ok: bool = False) -> "MemoryStore":
        """Read a store file (`.json`: a list of items; otherwise one item per line). A missing file with
        `missing_ok=True` gives an empty store that `save()` will create."""
        path = Path(path)
        if path.is_dir():
            raise MemoryFormatError(f"{path}: is a folder; a memory store is a file (one [key: value] per line)")
        if not path.is_file():
            if missing_ok:
                return cls(path=path, encoder=encoder, threshold=threshold)
            raise FileNotFoundError(f"{path}: memory store not found")
        text = read_text(path, MemoryFormatError)
        store = cls(path=path, encoder=encoder, threshold=threshold)
        if path.suffix.lower() == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise MemoryFormatError(f"{path}: invalid JSON ({e})") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise MemoryFormatError(f"{path}: expected a JSON list of \"[key: value]\" strings")
            lines = list(enumerate(items, start=1))
            where = "item"
        else:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                     if line.strip() and not line.lstrip().startswith("#")]
            where = "line"
        for n, line in lines:
            try:
                store.add(line)
            except MemoryFormatError:
                raise MemoryFormatError(f"{path}: {where} {n} is not a [key: value] item: {line.strip()!r}") from None
        return store

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the items atomically (JSON list for a `.json` path, else one per line)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("MemoryStore.save: no path given and the store was not loaded from a file")
        text = (json.dumps(self._items, ensure_ascii=False, indent=2) + "\n" if path.suffix.lower() == ".json"
                else "".join(f"{item}\n" for item in self._items))
        atomic_write_text(path, text)
        self.path = path
        return path

    def flush(self) -> None:
        if self.path is not None:
            self.save()

    # ---- items ------------------------------------------------------------------------------------------------
    @property
    def items(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: str) -> bool:
        """Store `[key: value]` (normalised). Same key: the value is replaced in place. Returns True if changed."""
        key, value = parse_item(item)
        new = format_item(key, value)
        for i, old in enumerate(self._items):
            if parse_item(old)[0] == key:
                if old == new:
                    return False
                self._items[i] = new
                return True
        self._items.append(new)
        return True

    def remove(self, key: str) -> bool:
        """Forget the item with this key. Returns True if one was removed."""
        key = clean_text(key)
        kept = [i for i in self._items if parse_item(i)[0] != key]
        changed = len(kept) != len(self._items)
        self._items = kept
        return changed


def load_memory_encoder(folder: str | os.PathLike, flag: str = "--memory-model"):
    """The memory's SentenceEncoder; only a sentence-transformers folder (modules.json) qualifies — a plain HF
    folder would load as an unnormalised encoder whose cosines mean something else."""
    from bert.model import SentenceEncoder, SentenceModelError

    folder = Path(folder)
    if folder.is_dir() and not (folder / "modules.json").is_file():
        raise SentenceModelError(f"{folder}: no modules.json, so not a sentence-transformers folder ({flag} wants "
                                 f"what `python -m sbert.train` writes, e.g. {TRAINED_DIR})")
    return SentenceEncoder.load(folder)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class MemoryQuery:
    """`python -m chat.memory` flags."""
    query: str = flag(None, help="the user's message", required=True)
    model: str | None = flag(None, kind="dir", help=f"sentence-transformers folder (default: {TRAINED_DIR}, "
                                                    "else the bundled MiniLM)")
    memory_store: str | None = flag(None, kind="file", aliases=("--store",),
                                    help="memory file: one [key: value] per line, or a .json list "
                                         "(default: a built-in example)")
    top: int = flag(5, range=COUNT, help="how many items to show")
    threshold: float | None = flag(None, range=COSINE, help="minimum cosine for an item to be used (default: the "
                                   f"model's calibrated threshold, else {DEFAULT_THRESHOLD})")


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m chat.memory", description="Show the memory items most similar to a message.")
    add_config_flags(parser, MemoryQuery)
    args = config_from_args(MemoryQuery, parser.parse_args(argv))
    if args.model is None:
        folder, note = default_model_dir()
        if note:
            print(note, file=sys.stderr)
    else:
        folder = args.model
    encoder = load_memory_encoder(folder, "--model")
    if args.memory_store is None:
        print("note: no --memory-store given; using a built-in example store", file=sys.stderr)
        store = MemoryStore(EXAMPLE_ITEMS, encoder=encoder, threshold=args.threshold)
    else:
        store = MemoryStore.load(args.memory_store, encoder=encoder, threshold=args.threshold)
    ranked = store.scores(args.query)
    if not ranked:
        print("(the memory store is empty)")
    for item, score in ranked[:args.top]:
        mark = "*" if score >= store.threshold else " "
        print(f"{mark} {score:.4f}  {item}")
    print(f"prompt: {store.build_prompt(args.query)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
