"""Evaluate a sentence encoder on (memory_0, user_prompt_1, similarity_score) pairs.

Figures (predicted = cos(embed(memory_0), embed(user_prompt_1)), true = similarity_score):

    MSE, MAE                 mean (squared | absolute) error of predicted vs true
    Pearson                  linear correlation of predicted vs true
    Spearman                 Pearson of the ranks (ties get their average rank)
    recall@1                 over the distinct messages m: is argmax_memory pred(memory, m) a memory whose
                             true score with m is 1.0 — i.e. would the chatbot fetch a right memory item?

    threshold, false, miss   the memory threshold (the model's saved one, else calibrated here, sbert.calibrate)
                             and at it the false-prepend rate on messages with no related memory and the miss
                             rate on related ones

Memories are encoded as passages and messages as queries, with the model's stored prompts (e5's `passage: ` /
`query: `; none for MiniLM), as the memory store does.

    python -m sbert.evaluate --model runs/sbert/best [more folders…] --data data/memory_test.csv [--json] [--plot scatter.png]

Pure numpy/pandas (no scipy). `evaluate(model, df)` is what `sbert.train` calls before and after training.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd

from core.atomic import atomic_write_file
from core.cli import COUNT, Parser, add_config_flags, config_from_args, flag, run_cli
from core.errors import OhLoRAError
from data.memory_pairs import KEY_ALIASES, CombinationFileError, build_pairs, read_combinations
from sbert.calibrate import best_items, calibration_set, encode_role, pick_threshold, rates

PAIR_COLUMNS = ("memory_0", "user_prompt_1", "similarity_score")
METRIC_NAMES = ("mse", "mae", "pearson", "spearman", "recall_at_1")
MEMORY_NAMES = ("threshold", "false_prepend", "miss")  # shown when present (sbert.calibrate)


class PairsFileError(OhLoRAError):
    """A pairs CSV (or combination file) that is missing, unreadable or lacks the required columns."""


class Encoder(Protocol):
    def encode(self, texts: Sequence[str], batch_size: int = 32, convert_to_numpy: bool = True) -> Any: ...


# --------------------------------------------------------------------------------------------------- metrics
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (the correlation is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"pearson: need two 1-D arrays of equal length ≥ 2, got {x.shape} and {y.shape}")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else float("nan")


def rank_average(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank (scipy.stats.rankdata's default)."""
    return pd.Series(np.asarray(x, dtype=np.float64)).rank(method="average").to_numpy()


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rank_average(x), rank_average(y))


def recall_at_1(messages: Sequence[str], predicted: Sequence[float], true: Sequence[float]) -> float:
    """Share of distinct messages whose highest-predicted candidate row has true score 1.0."""
    frame = pd.DataFrame({"message": list(messages), "pred": np.asarray(predicted, dtype=np.float64),
                          "true": np.asarray(true, dtype=np.float64)})
    if frame.empty:
        return float("nan")
    best_rows = frame.loc[frame.groupby("message", sort=False)["pred"].idxmax()]
    return float((best_rows["true"] >= 1.0 - 1e-9).mean())


def regression_metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    err = p - t
    return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))),
            "pearson": pearson(p, t), "spearman": spearman(p, t)}


# ----------------------------------------------------------------------------------------------- prediction
def bundled_pairs(name: str) -> Path:
    """Path of a file bundled in the `data` package (data/memory_train_combs.txt, data/memory_test.csv)."""
    import data
    return Path(data.__file__).resolve().parent / name


def load_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pairs CSV (memory_0, user_prompt_1, similarity_score), or a combination file (`.txt`, one
    `[key: value] message` per line: its N×N pairs, built as data.memory_pairs does with the extended key rule);
    raise PairsFileError naming the file otherwise."""
    path = Path(path)
    if path.suffix == ".txt":
        try:
            df = build_pairs(read_combinations(path), KEY_ALIASES)
        except (OSError, CombinationFileError) as err:
            raise PairsFileError(str(err)) from None
    else:
        df = _read_pairs_csv(path)
    df["memory_0"] = df["memory_0"].astype(str)
    df["user_prompt_1"] = df["user_prompt_1"].astype(str)
    return df


def _read_pairs_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PairsFileError(f"{path}: no such pairs CSV")
    try:
        df = pd.read_csv(path, encoding="utf-8", keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PairsFileError(f"{path}: not a readable UTF-8 CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise PairsFileError(f"{path}: missing column(s) {missing}; need {list(PAIR_COLUMNS)}")
    if df.empty:
        raise PairsFileError(f"{path}: no rows")
    try:
        df["similarity_score"] = df["similarity_score"].astype(np.float64)
    except ValueError:
        raise PairsFileError(f"{path}: similarity_score must be numeric") from None
    bad = np.flatnonzero(~np.isfinite(df["similarity_score"].to_numpy()))
    if len(bad):  # a NaN target would make every figure NaN (printed as null) without saying why
        raise PairsFileError(f"{path}: line {bad[0] + 2}: similarity_score is {df['similarity_score'].iloc[bad[0]]}"
                             + (f" ({len(bad)} rows in all)" if len(bad) > 1 else "") + "; scores must be finite")
    return df


def predict_similarities(model: Encoder, df: pd.DataFrame, batch_size: int = 32) -> np.ndarray:
    """cos(embed_passage(memory_0), embed_query(user_prompt_1)) per row; each distinct text is encoded once."""
    def unit_rows(texts: list[str], role: str) -> tuple[dict[str, int], np.ndarray]:
        emb = encode_role(model, texts, role, batch_size)
        return {t: i for i, t in enumerate(texts)}, emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    mi, mem = unit_rows(list(dict.fromkeys(df["memory_0"])), "passage")
    qi, msg = unit_rows(list(dict.fromkeys(df["user_prompt_1"])), "query")
    return np.sum(mem[[mi[t] for t in df["memory_0"]]] * msg[[qi[t] for t in df["user_prompt_1"]]], axis=1)


def evaluate(model: Encoder, df: pd.DataFrame, batch_size: int = 32,
             return_predictions: bool = False) -> dict[str, Any]:
    """All figures for `model` on `df`; with `return_predictions` also the per-row predictions."""
    pred = predict_similarities(model, df, batch_size)
    true = df["similarity_score"].to_numpy(dtype=np.float64)
    out: dict[str, Any] = regression_metrics(pred, true)
    out["recall_at_1"] = recall_at_1(df["user_prompt_1"].tolist(), pred, true)
    out["n_pairs"] = int(len(df))
    out["n_messages"] = int(df["user_prompt_1"].nunique())
    if return_predictions:
        out["predictions"] = pred
    return out


# ----------------------------------------------------------------------------------------------- reporting
def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one row per named result (e.g. {"before": ..., "after": ...}); the memory columns
    (threshold, false_prepend, miss) when any result has them."""
    names = METRIC_NAMES + tuple(n for n in MEMORY_NAMES if any(n in m for m in results.values()))
    width = max([10, *(len(label) + 1 for label in results)])
    lines = [f"{'':<{width}}" + "".join(f"{name:>14}" for name in names)]
    for label, metrics in results.items():
        lines.append(f"{label:<{width}}" + "".join(f"{_num(metrics.get(name)):>14.4f}" for name in names))
    return "\n".join(lines)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def memory_figures(model: Encoder, df: pd.DataFrame, batch_size: int = 32) -> dict[str, Any]:
    """threshold (the model's saved one, else calibrated on `df` + the bundled unrelated messages) and the
    false-prepend / miss rates at it (sbert.calibrate)."""
    best = best_items(model, calibration_set(df), batch_size)
    saved = getattr(model, "memory_threshold", None)
    t = float(saved) if saved is not None else pick_threshold(best["unrelated"])
    return {"threshold": t, "threshold_saved": saved is not None, **rates(best, t)}


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain JSON (NaN → null, arrays dropped)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, np.ndarray):
            continue
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def plot_scatter(predicted: Sequence[float], true: Sequence[float], png_path: str | os.PathLike,
                 title: str = "predicted vs true similarity") -> Path:
    """Predicted cosine (y) against the true score (x), with the y = x line; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(np.asarray(true), np.asarray(predicted), s=8, alpha=0.35)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--")
    ax.set_xlabel("true similarity_score")
    ax.set_ylabel("predicted cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write_file(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return png_path


@dataclass
class EvaluateArgs:
    """`python -m sbert.evaluate` flags."""
    model: tuple[str, ...] = flag(None, kind="dir", required=True,
                                  help="sentence-transformers folder(s) (ours or ST's); one table row each")
    data: str | None = flag(None, kind="file",
                            help="pairs CSV or .txt combination file (default: the bundled data/memory_test.csv)")
    batch_size: int = flag(32, range=COUNT, help="texts per forward")
    plot: str | None = flag(None, kind="output_file", help="write a predicted-vs-true scatter PNG here")
    json: bool = flag(False, help="print the figures as one JSON object on the last line")


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m sbert.evaluate",
                    description="MSE / MAE / Pearson / Spearman / recall@1 of a sentence encoder on memory pairs.")
    add_config_flags(parser, EvaluateArgs)
    args = config_from_args(EvaluateArgs, parser.parse_args(argv))
    from bert.model import SentenceEncoder

    data = args.data or str(bundled_pairs("memory_test.csv"))
    df = load_pairs(data)
    results: dict[str, dict[str, Any]] = {}
    for folder in args.model:
        model = SentenceEncoder.load(folder)
        metrics = evaluate(model, df, batch_size=args.batch_size, return_predictions=True)
        metrics.update(memory_figures(model, df, args.batch_size))
        results[_label(folder, results)] = metrics
    first = next(iter(results.values()))
    print(f"{data}: {first['n_pairs']} pairs, {first['n_messages']} messages "
          "(threshold: the model's saved one, else calibrated here for <= 10 % false prepends)")
    print(format_table(results))
    if args.plot:
        print(f"scatter plot: {plot_scatter(first['predictions'], df['similarity_score'], args.plot)}")
    if args.json:
        payload = {k: json_safe(v) for k, v in results.items()}
        print(json.dumps(payload if len(results) > 1 else next(iter(payload.values())), ensure_ascii=False))
    return 0


def _label(folder: str, taken: dict) -> str:
    """A short row label: the folder's last two path parts (runs/sbert-e5/best -> sbert-e5/best)."""
    parts = Path(folder).resolve().parts
    label = "/".join(parts[-2:]) if len(parts) >= 2 else str(folder)
    return label if label not in taken else f"{label}#{len(taken)}"


if __name__ == "__main__":
    sys.exit(main())
