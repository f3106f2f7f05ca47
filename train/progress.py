"""Progress bar, JSONL metric log and loss-curve plot shared by the trainers."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar; `enabled=False` (non-main ranks, tests) keeps the same API but prints nothing."""
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def print_line(text: str) -> None:
    """Print one line without breaking a running progress bar."""
    tqdm.write(text)


class JsonlLogger:
    """Appends one JSON object per line (with wall time) to `path`; a no-op when `path` is None.

    `size()` and `truncate(n)` let a resumed run cut the log back to where its state was saved."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._t0 = time.time()

    def log(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time_s": round(time.time() - self._t0, 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.is_file() else 0

    def truncate(self, n_bytes: int) -> None:
        """Keep the first `n_bytes` (0: an empty log); never grows the file."""
        if self.path is not None and self.path.is_file() and self.size() > n_bytes:
            os.truncate(self.path, n_bytes)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: Iterable[dict], png_path: str | os.PathLike, x: str = "step",
                ys: tuple[str, ...] = ("train_loss", "eval_loss"), title: str = "loss") -> Path | None:
    """Plot each key in `ys` against `x` from the records that have it; writes a PNG (headless backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.atomic import atomic_write_file

    records = list(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for key in ys:
        pts = [(r[x], r[key]) for r in records if x in r and r.get(key) is not None]
        if pts:
            xs, vs = zip(*pts)
            ax.plot(xs, vs, marker="." if len(pts) < 50 else None, label=key)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_write_file(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
