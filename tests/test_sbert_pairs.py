"""Pair generator: N lines → N×N rows, key IoU scores (hand-computed), errors, bundled CSVs up to date."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from data.memory_pairs import CombinationFileError, build_pairs, generate, key_similarity, parse_line, read_combinations

DATA = Path(__file__).resolve().parent.parent / "data"


def write(tmp_path, text, name="combs.txt", raw=False):
    p = tmp_path / name
    p.write_bytes(text if raw else text.encode("utf-8"))
    return p


@pytest.mark.parametrize("a, b, want", [
    ("오늘 일정", "오늘 일정", 1.0),
    ("오늘 일정", "오늘 기분", 0.3333),            # {오늘} / {오늘, 일정, 기분}
    ("좋아하는 음식", "싫어하는 음식", 0.3333),
    ("좋아하는 아이돌", "좋아하는 가수", 1.0),       # the idol/singer rule
    ("좋아하는 아이돌", "좋아하는 음식", 0.3333),    # the alias is scored as 좋아하는 가수
    ("좋아하는 아이돌", "좋아하는 아이돌", 1.0),
    ("취미", "오늘 일정", 0.0),
    ("주말 계획", "여름 방학 계획", 0.25),         # {계획} / {주말, 여름, 방학, 계획}
    ("오늘 저녁 일정", "오늘 일정", 0.6667),       # 2/3 rounded to 4 decimals
    ("a b c d e f", "a x y z u v w", 0.0833),   # 1/12 = 0.08333… → 0.0833
])
def test_key_similarity_hand_computed(a, b, want):
    assert key_similarity(a, b) == pytest.approx(want, abs=1e-12)
    assert key_similarity(b, a) == pytest.approx(want, abs=1e-12)


def test_parse_line_fields():
    line = parse_line("[오늘 일정: 친구랑 카페 방문] 아 오늘 뭐 입고 나가지", "x.txt", 3)
    assert (line.memory, line.key, line.value, line.message, line.line_no) == (
        "[오늘 일정: 친구랑 카페 방문]", "오늘 일정", "친구랑 카페 방문", "아 오늘 뭐 입고 나가지", 3)


def test_n_lines_give_n_squared_rows_in_order(tmp_path):
    p = write(tmp_path, "[오늘 일정: 발표] 나 떨려\n\n[오늘 기분: 좋음] 히히\n[좋아하는 아이돌: 아이브] 신곡 들었어?\n"
                        "[좋아하는 가수: 아이유] 노래 추천해줘\n")
    df = build_pairs(read_combinations(p))
    assert list(df.columns) == ["memory_0", "user_prompt_1", "similarity_score"]
    assert len(df) == 16                       # 4 non-blank lines → 4 × 4
    assert df.iloc[1].tolist() == ["[오늘 일정: 발표]", "히히", 0.3333]
    assert df.iloc[2 * 4 + 3].tolist() == ["[좋아하는 아이돌: 아이브]", "노래 추천해줘", 1.0]
    assert df["similarity_score"].tolist().count(1.0) == 4 + 2   # diagonal + the idol/singer pair both ways
    assert df["similarity_score"].sum() == pytest.approx(6 + 2 * 0.3333)   # 오늘 일정 ↔ 오늘 기분, both ways


@pytest.mark.parametrize("text, line_no", [
    ("[오늘 일정: 발표] 나 떨려\n오늘 일정: 발표 나 떨려\n", 2),     # no brackets
    ("[오늘 일정: 발표] 나 떨려\n\n[오늘 일정 발표] 떨려\n", 3),      # no colon (blank line still counted)
    ("[오늘 일정: 발표]\n", 1),                                   # no message
    ("[오늘 일정: ] 떨려\n", 1),                                  # empty value
])
def test_malformed_line_names_file_and_line(tmp_path, text, line_no):
    p = write(tmp_path, text)
    with pytest.raises(CombinationFileError, match=rf"combs\.txt:{line_no}:"):
        read_combinations(p)


def test_bad_utf8_and_missing_file(tmp_path):
    p = write(tmp_path, "[a: b] c\n".encode() + b"\xff\xfe oops\n", raw=True)
    with pytest.raises(CombinationFileError, match=r"combs\.txt:2: not valid UTF-8"):
        read_combinations(p)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_combinations(tmp_path / "nope.txt")


def test_cli_writes_csv_and_exits_2_on_error(tmp_path):
    good = write(tmp_path, "[취미: 독서] 책 추천해줘\n[취미: 게임] 랭크 올렸다\n")
    out = tmp_path / "sub" / "out.csv"
    run = subprocess.run([sys.executable, "-m", "data.memory_pairs", str(good), str(out)],
                         capture_output=True, text=True, cwd=DATA.parent)
    assert run.returncode == 0, run.stderr
    assert pd.read_csv(out)["similarity_score"].tolist() == [1.0] * 4
    bad = write(tmp_path, "[취미: 독서] 책\n[취미 게임] 랭크\n", name="bad.txt")
    run = subprocess.run([sys.executable, "-m", "data.memory_pairs", str(bad), str(tmp_path / "b.csv")],
                         capture_output=True, text=True, cwd=DATA.parent)
    assert run.returncode == 2 and "bad.txt:2:" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "b.csv").exists()


def test_bundled_test_csv_matches_generator(tmp_path):
    lines = read_combinations(DATA / "memory_test_combs.txt")
    assert len(lines) == 20
    fresh = generate(DATA / "memory_test_combs.txt", tmp_path / "fresh.csv")
    bundled = pd.read_csv(DATA / "memory_test.csv", keep_default_na=False)
    assert len(bundled) == 20 * 20
    pd.testing.assert_frame_equal(bundled, pd.read_csv(tmp_path / "fresh.csv", keep_default_na=False))
    assert bundled.equals(fresh.astype(bundled.dtypes.to_dict()))


def test_bundled_training_pairs_are_built_from_the_combination_file(tmp_path):
    """The training pairs ship as their combination file (334 lines -> 111,556 pairs, 8 MB as a CSV): loading
    the .txt gives exactly the CSV `python -m data.memory_pairs` writes."""
    from sbert.evaluate import load_pairs
    assert len(read_combinations(DATA / "memory_train_combs.txt")) == 334
    generate(DATA / "memory_train_combs.txt", tmp_path / "train.csv")
    from_txt, from_csv = load_pairs(DATA / "memory_train_combs.txt"), load_pairs(tmp_path / "train.csv")
    assert len(from_txt) == 334 * 334 and int((from_txt.similarity_score == 1.0).sum()) == 7048
    pd.testing.assert_frame_equal(from_txt, from_csv)


def test_bundled_sets_are_disjoint_and_every_test_message_has_another_exact_match():
    train = read_combinations(DATA / "memory_train_combs.txt")
    test = read_combinations(DATA / "memory_test_combs.txt")
    assert not {(x.memory, x.message) for x in train} & {(x.memory, x.message) for x in test}
    assert len({x.key for x in train}) >= 12
    for line in test:   # a score-1.0 memory besides the message's own line
        assert sum(key_similarity(line.key, other.key) == 1.0 for other in test) >= 2
    # the no-related-memory messages: their keys share no word with a train or test key (docs/data.md)
    words = {w for line in train + test for w in line.key.split()}
    unrelated = read_combinations(DATA / "memory_unrelated_combs.txt")
    assert len(unrelated) == 40 and not [x.key for x in unrelated if set(x.key.split()) & words]
    assert not {x.message for x in train} & {x.message for x in test}
