"""data/sft.py: prompt template, loss masking, boundary tokenisation, bucketing, collator, CSV errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.sft import (IGNORE_INDEX, PromptTemplate, SFTDataError, collate, encode_pair, encode_pairs,
                      length_bucketed_batches, load_sft_csv, padding_stats)
from core.tokenizer import Tokenizer
from train.default_model import bundled_data_path, save_tokenizer, train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    data = load_sft_csv(bundled_data_path())
    texts = [p.input_text for p in data.train + data.valid] + [p.output_text for p in data.train]
    folder = tmp_path_factory.mktemp("sft_tok")
    save_tokenizer(train_tokenizer(texts, 800), folder)
    return Tokenizer.from_folder(folder)


def test_template_defaults_are_the_originals():
    t = PromptTemplate()
    assert t.prompt("안녕") == "안녕 (답변 시작) ### 답변:"
    assert t.full("안녕", "반가워") == "안녕 (답변 시작) ### 답변: 반가워 (답변 종료)"
    assert t.full("a", "b") == t.prompt("a") + t.answer_text("b")


def test_labels_mask_exactly_the_prompt(tokenizer):
    t = PromptTemplate()
    ex, truncated = encode_pair(tokenizer, t, "[오늘 일정: 카페] 오늘 뭐 해?", "카페 가자! [기분: 좋음]")
    n_prompt = len(tokenizer.encode(t.prompt("[오늘 일정: 카페] 오늘 뭐 해?")))
    answer = tokenizer.encode(t.answer_text("카페 가자! [기분: 좋음]")) + [tokenizer.eos_token_id]
    assert not truncated
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == answer == ex.input_ids[n_prompt:]
    assert ex.labels[-1] == tokenizer.eos_token_id and ex.n_label_tokens == len(answer)


def test_split_tokenisation_equals_whole_string_on_bundled_data(tokenizer):
    """Tokenising prompt and answer apart gives the same ids as the whole text (byte-level BPE)."""
    t = PromptTemplate()
    data = load_sft_csv(bundled_data_path())
    pairs = data.train + data.valid
    assert len(pairs) >= 280
    mismatches = [p.input_text for p in pairs
                  if tokenizer.encode(t.prompt(p.input_text)) + tokenizer.encode(t.answer_text(p.output_text))
                  != tokenizer.encode(t.full(p.input_text, p.output_text))]
    assert mismatches == []


def test_truncation_counts_and_keeps_the_prompt(tokenizer):
    t = PromptTemplate()
    data = load_sft_csv(bundled_data_path())
    full = encode_pairs(tokenizer, t, data.train)
    longest = max(len(e) for e in full.examples)
    cut = encode_pairs(tokenizer, t, data.train, max_length=longest - 3)
    n_long = sum(len(e) > longest - 3 for e in full.examples)
    assert cut.n_truncated == n_long >= 1
    assert max(len(e) for e in cut.examples) == longest - 3
    assert full.n_truncated == 0


def test_collate_pads_right_with_ignored_labels(tokenizer):
    t = PromptTemplate()
    a, _ = encode_pair(tokenizer, t, "안녕", "반가워")
    b, _ = encode_pair(tokenizer, t, "오늘 날씨 어때? 비 온대?", "우산 꼭 챙겨! 감기 조심하고.")
    batch = collate([a, b], pad_token_id=1)
    T = max(len(a), len(b))
    assert batch["input_ids"].shape == (2, T)
    assert batch["attention_mask"][0].tolist() == [1] * len(a) + [0] * (T - len(a))
    assert batch["labels"][0, len(a):].tolist() == [IGNORE_INDEX] * (T - len(a))
    assert batch["input_ids"][0, len(a):].tolist() == [1] * (T - len(a))
    assert batch["labels"][1].tolist() == b.labels


def test_bucketing_is_deterministic_covers_all_and_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (1000,), generator=g).tolist()
    e0 = length_bucketed_batches(lengths, 4, seed=7, epoch=0, chunk_batches=50)
    assert e0 == length_bucketed_batches(lengths, 4, seed=7, epoch=0, chunk_batches=50)
    assert e0 != length_bucketed_batches(lengths, 4, seed=7, epoch=1, chunk_batches=50)
    assert sorted(i for b in e0 for i in b) == list(range(1000))
    real, padded = padding_stats(e0, lengths)
    perm = torch.randperm(1000, generator=g).tolist()
    rand = [perm[i:i + 4] for i in range(0, 1000, 4)]
    real_r, padded_r = padding_stats(rand, lengths)
    assert real == real_r
    assert 1 - real / padded < 0.02           # ≤ 2 % pad tokens with bucketing
    assert 1 - real_r / padded_r > 0.2        # vs > 20 % for random batches of 4


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_original_layout_data_type_and_prompt_only_rows(tmp_path):
    f = _write(tmp_path / "orig.csv", "data_type,input_data,output_data\ntrain,안녕,안녕! 반가워\n"
               "train,뭐 해?,그냥 쉬고 있어\nvalid,좋은 밤,\nvalid,점심 뭐 먹지?,\n")
    d = load_sft_csv(f)
    assert [p.input_text for p in d.train] == ["안녕", "뭐 해?"]
    assert d.valid == [] and [p.input_text for p in d.prompts] == ["좋은 밤", "점심 뭐 먹지?"]
    assert d.sample_prompts(1) == ["좋은 밤"]


def test_custom_columns_by_flag(tmp_path):
    f = _write(tmp_path / "c.csv", "part,q,a\ntrain,안녕,반가워\nvalid,잘 자,너도\n")
    d = load_sft_csv(f, input_column="q", output_column="a", split_column="part")
    assert (len(d.train), len(d.valid)) == (1, 1)


@pytest.mark.parametrize("content, problem", [
    ("split,question,output_data\ntrain,a,b\n", "no column 'input_data'"),
    (b"split,input_data,output_data\ntrain,\xff\xfe,b\n", "not valid UTF-8"),
    ("", "empty"),
    ("split,input_data,output_data\nholdout,a,b\n", "unknown split value 'holdout'"),
    ("split,input_data,output_data\nvalid,a,b\n", "no training rows"),
])
def test_bad_csv_errors_name_the_file(tmp_path, content, problem):
    f = _write(tmp_path / "bad.csv", content)
    with pytest.raises(SFTDataError) as e:
        load_sft_csv(f)
    assert str(f) in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(SFTDataError, match="not found"):
        load_sft_csv(tmp_path / "nope.csv")
