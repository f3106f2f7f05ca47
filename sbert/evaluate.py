"""Evaluate a sentence encoder on (memory_0, user_prompt_1, similarity_score) pairs.

Figures (predicted = cos(embed(memory_0), embed(user_prompt_1)), true = similarity_score):

    MSE, MAE                 mean (squared | absolute) error of predicted vs true
    Pearson                  linear correlation of predicted vs true
    Spearman                 Pearson of the ranks (ties get their average rank)
    recall@1                 over the distinct messages m: is argmax_memory pred(memory, m) a memory whose
                             true score with m is 1.0 — i.e. would the chatbot fetch a right memory item?

    python -m sbert.evaluate --model runs/sbert/best --data data/memory_test.csv [--json] [--plot scatter.png]

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

PAIR_COLUMNS = ("memory_0", "user_prompt_1", "similarity_score")
METRIC_NAMES = ("mse", "mae", "pearson", "spearman", "recall_at_1")


class PairsFileError(OhLoRAError):
    """A pairs CSV that is missing, unreadable or lacks the required columns."""


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
    """Path of a CSV bundled in the `data` package (data/memory_train.csv, data/memory_test.csv)."""
    import data
    return Path(data.__file__).resolve().parent / name


def load_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pairs CSV and check its columns; raise PairsFileError naming the file otherwise."""
    path = Path(path)
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
    df["memory_0"] = df["memory_0"].astype(str)
    df["user_prompt_1"] = df["user_prompt_1"].astype(str)
    return df


def predict_similarities(model: Encoder, df: pd.DataFrame, batch_size: int = 32) -> np.ndarray:
    """cos(embed(memory_0), embed(user_prompt_1)) per row; each distinct text is encoded once."""
    texts = list(dict.fromkeys([*df["memory_0"], *df["user_prompt_1"]]))
    index = {t: i for i, t in enumerate(texts)}
    emb = _encode_eval(model, texts, batch_size)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    u = emb[[index[t] for t in df["memory_0"]]]
    v = emb[[index[t] for t in df["user_prompt_1"]]]
    return np.sum(u * v, axis=1)


def _encode_eval(model: Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Encode in eval mode (no dropout) and restore the caller's train/eval mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        import torch
        with torch.inference_mode():
            out = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return np.asarray(out, dtype=np.float64)


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
    """A fixed-width table, one row per named result (e.g. {"before": ..., "after": ...})."""
    head = f"{'':<10}" + "".join(f"{name:>12}" for name in METRIC_NAMES)
    lines = [head]
    for label, metrics in results.items():
        lines.append(f"{label:<10}" + "".join(f"{metrics.get(name, float('nan')):>12.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)


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
    model: str = flag(None, kind="dir", required=True, help="sentence-transformers folder (ours or ST's)")
    data: str | None = flag(None, kind="file", help="pairs CSV (default: the bundled data/memory_test.csv)")
    batch_size: int = flag(32, range=COUNT, help="texts per forward")
    plot: str | None = flag(None, kind="output_file", help="write a predicted-vs-true scatter PNG here")
    json: bool = flag(False, help="print the figures as one JSON object on the last line")


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m sbert.evaluate",
                    description="MSE / MAE / Pearson / Spearman / recall@1 of a sentence encoder on memory pairs.")
    add_config_flags(parser, EvaluateArgs)
    args = config_from_args(EvaluateArgs, parser.parse_args(argv))
    from sbert.model import SentenceEncoder

    data = args.data or str(bundled_pairs("memory_test.csv"))
    df = load_pairs(data)
    model = SentenceEncoder.load(args.model)
    metrics = evaluate(model, df, batch_size=args.batch_size, return_predictions=True)
    print(f"{data}: {metrics['n_pairs']} pairs, {metrics['n_messages']} messages")
    print(format_table({"model": metrics}))
    if args.plot:
        print(f"scatter plot: {plot_scatter(metrics['predictions'], df['similarity_score'], args.plot)}")
    if args.json:
        print(json.dumps(json_safe(metrics), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
