"""sbert.train: batching / dedup / split helpers (exact), the loss equals the naive siamese loss, and a short
real training run on the bundled data that lowers the test MSE and whose best checkpoint reloads exactly."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sbert.evaluate import bundled_pairs, evaluate, load_pairs
from bert.model import SentenceEncoder
from chat.memory import MemoryStore
from bert.bases import bundled_minilm_dir
from sbert.calibrate import pick_threshold, rates
from sbert.losses import LOSSES, mnr, mnr_mse
from sbert.train import (NO_DECAY, PairLoss, TokenCache, TrainConfig, default_max_seq_length, key_score_table,
                         make_batches, plan_forwards, split_train_valid, train)
from train.optim import build_adamw

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def minilm():
    model = SentenceEncoder.load(bundled_minilm_dir())
    model.max_seq_length = 128
    return model


def test_split_is_seeded_disjoint_and_90_10():
    df = load_pairs(bundled_pairs("memory_train_combs.txt"))
    fit, valid = split_train_valid(df, 0.1, seed=7)
    assert (len(fit), len(valid)) == (100400, 11156)
    key = lambda d: set(zip(d.memory_0, d.user_prompt_1))  # noqa: E731
    assert not key(fit) & key(valid) and len(key(fit) | key(valid)) == 111556
    again, _ = split_train_valid(df, 0.1, seed=7)
    assert again.equals(fit)
    assert not split_train_valid(df, 0.1, seed=8)[0].equals(fit)


@pytest.mark.parametrize("bucket", [False, True])
def test_make_batches_cover_every_pair_once(bucket):
    lengths = np.random.default_rng(0).integers(5, 60, size=1000)
    batches = make_batches(lengths, 16, np.random.default_rng(1), bucket)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert len(batches) == 63 and max(len(b) for b in batches) == 16
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert (spread < 10) if bucket else (spread > 30)   # buckets hold similar lengths


def test_plan_forwards_splits_only_when_it_pads_less():
    # one forward: 4 × 60 = 240 padded tokens; split after the three short ones: 3·5 + 60 + 64 = 139
    assert plan_forwards([60, 5, 5, 5], allow_split=True) == [[1, 2, 3], [0]]
    assert plan_forwards([60, 5, 5, 5], allow_split=False) == [[1, 2, 3, 0]]
    assert plan_forwards([12, 10, 14], allow_split=True) == [[1, 0, 2]]


def test_default_length_per_base(minilm):
    assert default_max_seq_length(minilm) == 128   # MiniLM: Hangul as jamo pieces, ~2-3 tokens per syllable


@pytest.mark.parametrize("allow_split", [False, True])
def test_pair_loss_equals_naive_siamese_loss(minilm, allow_split):
    df = load_pairs(bundled_pairs("memory_train_combs.txt")).iloc[[0, 1, 2, 41, 80, 81, 500, 1599]]
    cache = TokenCache(minilm, [*df.memory_0, *df.user_prompt_1])
    a, b = np.asarray(cache.ids(df.memory_0.tolist())), np.asarray(cache.ids(df.user_prompt_1.tolist()))
    scores = torch.tensor(df.similarity_score.to_numpy(), dtype=torch.float32)
    minilm.eval()   # no dropout: both paths must give the same numbers
    loss, n = PairLoss(minilm, cache, "cosine-mse", allow_split)(a, b, scores)
    assert n == 8
    loss.backward()
    grads = {n: p.grad.clone() for n, p in minilm.named_parameters() if p.grad is not None}
    minilm.zero_grad(set_to_none=True)
    u = minilm(minilm.tokenize(df.memory_0.tolist()))
    v = minilm(minilm.tokenize(df.user_prompt_1.tolist()))
    naive = F.mse_loss(F.cosine_similarity(u, v, dim=-1), scores, reduction="sum")
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), abs=1e-5)
    for n, p in minilm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n] / 8, p.grad / 8, atol=1e-6, rtol=1e-4)  # per-pair means
    minilm.zero_grad(set_to_none=True)


def test_optimizer_has_no_decay_on_bias_and_layernorm(minilm):
    opt = build_adamw(minilm.named_parameters(), 2e-5, 0.01, no_decay=NO_DECAY)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(minilm.named_parameters())
    assert decays[id(named["encoder.encoder.layer.0.attention.self.query.weight"])] == 0.01
    assert decays[id(named["encoder.encoder.layer.0.attention.self.query.bias"])] == 0.0
    assert decays[id(named["encoder.embeddings.LayerNorm.weight"])] == 0.0
    assert len(decays) == sum(p.requires_grad for p in minilm.parameters())


def test_short_training_lowers_test_mse_and_best_checkpoint_reloads(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(base=str(bundled_minilm_dir()), loss="cosine-mse", limit=400, epochs=1, lr=2e-5, batch_size=16,
                               output=str(out), progress=False, log_every=5))
    before, best = result.test["before"], result.test["best"]
    assert result.global_step == 23                            # 360 training pairs / 16, rounded up
    assert best["mse"] < 0.75 * before["mse"], (before["mse"], best["mse"])
    # the saved best checkpoint reproduces its reported test MSE
    reloaded = evaluate(SentenceEncoder.load(out / "best"), load_pairs(bundled_pairs("memory_test.csv")))
    assert reloaded["mse"] == pytest.approx(best["mse"], abs=1e-6)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"]["best"]["mse"] == pytest.approx(best["mse"], abs=1e-9)
    assert json.loads((out / "best" / "training_args.json").read_text())["epoch"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r] == [5, 10, 15, 20, 23]
    assert [r["eval_loss"] for r in log if "eval_loss" in r] == [pytest.approx(result.best_eval_loss)]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "test_scatter.png").is_file()
    assert (out / "last" / "model.safetensors").is_file()
    # the calibrated threshold is saved with the model and read back by the memory store
    saved = json.loads((out / "best" / "ohlora_memory.json").read_text(encoding="utf-8"))
    assert -1.0 <= saved["threshold"] <= 1.0 and saved["calibration"]["false_prepend"] <= 0.10
    assert saved["calibration"]["n_unrelated"] == 40 and saved["calibration"]["n_related"] == 20
    assert best["threshold"] == saved["threshold"]
    store = MemoryStore(["[취미: 등산]"], encoder=SentenceEncoder.load(out / "best"))
    assert store.threshold == saved["threshold"] != 0.6
    assert SentenceEncoder.load(out / "best").prompts == {}  # MiniLM: no prefixes


def test_cli_bad_base_exits_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sbert.train", "--model", str(tmp_path / "no-model"),
                          "--output-dir", str(tmp_path / "o"), "--test", ""], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "no-model" in run.stderr and "Traceback" not in run.stderr


def test_mnr_equals_hand_computed_value():
    """Toy batch of 3 positive pairs in 2-d; memory 2 has message 0's key too (a false negative, masked)."""
    deg = lambda a: torch.tensor([np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))], dtype=torch.float64)  # noqa: E731
    u = torch.stack([deg(0), deg(90), deg(45)]) * 2.0          # memories (not unit: the loss normalises)
    v = torch.stack([deg(30), deg(80), deg(40)])               # messages
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    s = 20.0
    cos = lambda a, b: np.cos(np.deg2rad(a - b))  # noqa: E731
    # row 0: candidates memory 0 (target) and 1 (memory 2 masked); row 1: all three; row 2: memories 1, 2
    want = (-np.log(np.exp(s * cos(30, 0)) / (np.exp(s * cos(30, 0)) + np.exp(s * cos(30, 90))))
            - np.log(np.exp(s * cos(80, 90)) / sum(np.exp(s * cos(80, a)) for a in (0, 90, 45)))
            - np.log(np.exp(s * cos(40, 45)) / (np.exp(s * cos(40, 45)) + np.exp(s * cos(40, 90)))))
    loss, n = mnr(u, v, scores, scale=s)
    assert n == 3 and loss.item() == pytest.approx(want, abs=1e-9)
    assert loss.item() == pytest.approx(0.0372688559, abs=1e-9)  # the same number, written down
    mse = sum((cos(m, a) - scores[i, j].item()) ** 2 for i, m in enumerate((30, 80, 40))
              for j, a in enumerate((0, 90, 45))) / 3
    mixed, n = mnr_mse(u, v, scores, scale=s, mse_weight=0.5)
    assert n == 3 and mixed.item() == pytest.approx(want + 0.5 * mse, abs=1e-9)
    assert set(LOSSES) == {"cosine-mse", "mnr", "mnr+mse"}


def test_key_score_table_and_threshold_pick():
    table = key_score_table(["[오늘 일정: 면접]", "[좋아하는 아이돌: 아이브]", "[좋아하는 가수: 임영웅]", "[오늘 기분: 설렘]"])
    np.testing.assert_allclose(table, [[1, 0, 0, .3333], [0, 1, 1, 0], [0, 1, 1, 0], [.3333, 0, 0, 1]], atol=1e-6)
    # 10 unrelated best cosines: at most 1 may pass -> just above the 2nd highest (0.7)
    unrelated = np.array([0.9, 0.7, 0.65, 0.3, 0.2, 0.1, 0.0, 0.5, 0.4, 0.6])
    t = pick_threshold(unrelated, 0.10)
    assert t == 0.7001
    best = {"unrelated": unrelated, "related": np.array([0.95, 0.71, 0.69, 0.8]),
            "related_right": np.array([True, True, True, False])}
    assert rates(best, t) == {"false_prepend": 0.1, "miss": 0.5, "wrong_item": 0.25}
