"""bert.model.SentenceEncoder vs sentence-transformers 6.2.0: embeddings, both folder dialects, save/load both ways."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bert.model import SentenceEncoder, SentenceModelError
from tests.sbert_fixtures import (SBERT_TEXTS, minilm_dir, minilm_encoder,  # noqa: F401 (fixture)
                                  save_tiny_hf_encoder, save_tiny_st)

LONG_KO = "비 오는 날에는 집에서 따뜻한 차를 마시면서 영화 보는 게 최고야. " * 12  # > 256 MiniLM tokens
TEXTS = SBERT_TEXTS + [LONG_KO, "Sentence embeddings map text to vectors; cosine compares them.", "ok"]


def _assert_same(a: np.ndarray, b: np.ndarray, max_abs: float = 1e-4, min_cos: float = 0.9999) -> None:
    assert a.shape == b.shape
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.abs(a - b).max() <= max_abs and cos.min() >= min_cos


@pytest.fixture(scope="module")
def st_minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.fixture(scope="module")
def tiny_st6(tmp_path_factory):
    """A tiny RoBERTa (klue-like WordPiece, pad 1) wrapped and saved by sentence-transformers 6.2.0 itself."""
    root = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_hf_encoder(root / "hf", model_type="roberta", head="mlm")
    save_tiny_st(root / "st", hf, normalize=True, max_seq_length=16, do_lower_case=True)
    return root


def test_minilm_matches_sentence_transformers(minilm_encoder, st_minilm):
    ours = minilm_encoder
    assert (ours.max_seq_length, ours.normalize, ours.embedding_dim) == (256, True, 384)
    assert st_minilm.max_seq_length == 256
    assert len(ours.tokenizer.encode([LONG_KO])[0].ids) == 256  # truncated, like ST
    a, b = ours.encode(TEXTS), st_minilm.encode(TEXTS, convert_to_numpy=True)
    _assert_same(a, b)
    assert np.linalg.norm(a, axis=1) == pytest.approx(1.0, abs=1e-5)
    ids = st_minilm.tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ours_ids = ours.tokenize(TEXTS)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours_ids[key], ids[key])


def test_st6_dialect_tiny_roberta_loads_in_ours(tiny_st6):
    from sentence_transformers import SentenceTransformer

    folder = tiny_st6 / "st"
    types = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert types == ["sentence_transformers.base.modules.transformer.Transformer",
                     "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
                     "sentence_transformers.base.modules.normalize.Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 16
    ours, st = SentenceEncoder.load(folder), SentenceTransformer(str(folder), device="cpu")
    assert (ours.max_seq_length, ours.normalize, st.max_seq_length) == (16, True, 16)
    _assert_same(ours.encode(TEXTS), st.encode(TEXTS), max_abs=1e-5)
    # do_lower_case was baked into tokenizer.json: same ids, so the same vector up to GEMM row rounding
    assert torch.equal(*ours.tokenize(["THE QUICK BROWN FOX", "the quick brown fox"])["input_ids"])
    upper = ours.encode(["THE QUICK BROWN FOX", "the quick brown fox"])
    assert np.abs(upper[0] - upper[1]).max() <= 1e-6


def test_plain_hf_folder_is_mean_pooling_without_normalise(tiny_st6):
    from sentence_transformers import SentenceTransformer

    hf = tiny_st6 / "hf"  # RobertaForMaskedLM checkpoint: `roberta.` prefix + lm_head
    ours, st = SentenceEncoder.load(hf), SentenceTransformer(str(hf), device="cpu")
    assert (ours.normalize, ours.max_seq_length, st.max_seq_length) == (False, 32, 32)
    a = ours.encode(TEXTS)
    _assert_same(a, st.encode(TEXTS), max_abs=1e-5)
    assert np.abs(np.linalg.norm(a, axis=1) - 1).max() > 0.1  # really not normalised


def test_our_save_loads_in_sentence_transformers(tmp_path, tiny_st6):
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    ours = SentenceEncoder.load(tiny_st6 / "hf")  # cased tokenizer, no pooler weights
    ours.max_seq_length = 12
    ours.do_lower_case = True  # legacy flag: ST adds a Lowercase normalizer on load
    folder = ours.save(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # atomic: no temp folder left
    legacy = json.loads((folder / "sentence_bert_config.json").read_text())
    assert legacy == {"max_seq_length": 12, "do_lower_case": True}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # zero pooler: transformers reports no MISSING
        assert "pooler.dense.weight" in f.keys() and not f.get_tensor("pooler.dense.weight").any()
    st = SentenceTransformer(str(folder), device="cpu")
    back = SentenceEncoder.load(folder)
    assert st.max_seq_length == back.max_seq_length == 12 and len(st) == 2 and not back.normalize
    lowered = back.encode(["HELLO WORLD", "hello world"])
    assert np.abs(lowered[0] - lowered[1]).max() <= 1e-6  # lower-casing now applied by both
    _assert_same(back.encode(TEXTS), st.encode(TEXTS), max_abs=1e-5)
    ours.save(folder)  # overwrite in place: still one complete folder
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_minilm_round_trips_through_both_libraries(tmp_path, minilm_encoder, st_minilm):
    from sentence_transformers import SentenceTransformer

    st_minilm.save(str(tmp_path / "by_st"))  # ST 6.x dialect with the real weights
    from_st = SentenceEncoder.load(tmp_path / "by_st")
    assert (from_st.max_seq_length, from_st.normalize) == (256, True)
    reference = st_minilm.encode(TEXTS)
    _assert_same(from_st.encode(TEXTS), reference)
    minilm_encoder.save(tmp_path / "by_us")  # our (legacy) dialect
    st_back = SentenceTransformer(str(tmp_path / "by_us"), device="cpu")
    assert st_back.max_seq_length == 256 and len(st_back) == 3  # Transformer, Pooling, Normalize
    _assert_same(st_back.encode(TEXTS), reference)


def test_encode_order_batches_duplicates_and_shapes(tiny_st6):
    enc = SentenceEncoder.load(tiny_st6 / "st")
    full = enc.encode(TEXTS, batch_size=32)
    small = enc.encode(TEXTS, batch_size=3)
    assert np.abs(full - small).max() <= 1e-5
    for i, text in enumerate(TEXTS[:3]):
        single = enc.encode(text)
        assert single.shape == (32,) and np.abs(single - full[i]).max() <= 1e-5
    dup = enc.encode([TEXTS[2], TEXTS[0], TEXTS[2]])
    assert np.abs(dup[0] - dup[2]).max() <= 1e-6 and np.abs(dup[1] - full[0]).max() <= 1e-5
    assert enc.encode([]).shape == (0, 32)
    t = enc.encode(TEXTS[:2], convert_to_numpy=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.requires_grad
    raw = enc.encode(TEXTS, normalize=False)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.01
    assert np.abs(raw / np.linalg.norm(raw, axis=1, keepdims=True) - full).max() <= 1e-5
    enc.train()
    enc.encode(TEXTS[:2])
    assert enc.training  # encode runs in eval mode and restores the caller's mode


def encode_without_onednn(model, texts):
    """encode() on the plain F.linear path (the reference the oneDNN fast path must equal)."""
    from core.onednn import FAST_PATH

    FAST_PATH.enabled = False
    try:
        return model.encode(texts)
    finally:
        FAST_PATH.enabled = True


def test_onednn_path_equals_plain_path(minilm_encoder):
    fast = minilm_encoder.encode(SBERT_TEXTS)
    plain = encode_without_onednn(minilm_encoder, SBERT_TEXTS)
    _assert_same(fast, plain, max_abs=2e-6, min_cos=0.999999)
    layer = minilm_encoder.encoder.encoder.layer[0].intermediate
    from core.onednn import invalidate_packs, packing_available
    was_training = minilm_encoder.training
    minilm_encoder.eval()
    with torch.no_grad():  # a hand-made weight change: the pack is stale until invalidated, then current
        x = torch.randn(2, 3, 384)
        layer(x)
        layer.dense.weight.data.mul_(0.5)
        try:
            if packing_available():  # proves the pack is a cache that only an explicit invalidation refreshes
                assert not torch.allclose(layer(x), torch.nn.functional.gelu(layer.dense(x)), atol=1e-3)
            invalidate_packs(minilm_encoder)
            assert torch.allclose(layer(x), torch.nn.functional.gelu(layer.dense(x)), atol=1e-5)
        finally:
            layer.dense.weight.data.mul_(2.0)
            invalidate_packs(minilm_encoder)
            minilm_encoder.train(was_training)


def test_encode_after_fused_adamw_step_uses_new_weights(tiny_st6):
    """torch's fused AdamW (what train/optim.py builds): the step hook drops the stale packs."""
    from core.onednn import invalidate_on_step
    model = SentenceEncoder.load(tiny_st6 / "st")
    before = model.encode(TEXTS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    invalidate_on_step(opt, model)
    model.train()
    model(model.tokenize(TEXTS)).sum().backward()
    opt.step()
    after = model.encode(TEXTS)
    plain = encode_without_onednn(model, TEXTS)
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(after - plain).max() <= 1e-5


def test_forward_is_differentiable_and_matches_encode(tiny_st6):
    model = SentenceEncoder.load(tiny_st6 / "st")
    features = model.tokenize(TEXTS[:4])
    model.eval()
    with torch.no_grad():
        assert np.abs(model(features).numpy() - model.encode(TEXTS[:4])).max() <= 1e-6
    model.train()
    u, v = model(features), model(model.tokenize(TEXTS[4:8]))
    loss = ((torch.cosine_similarity(u, v) - 0.5) ** 2).mean()
    loss.backward()
    grad = model.encoder.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_max_seq_length_setter(minilm_encoder, st_minilm):
    enc = minilm_encoder
    try:
        enc.max_seq_length, st_minilm.max_seq_length = 8, 8
        assert enc.tokenize([LONG_KO])["input_ids"].shape == (1, 8)
        _assert_same(enc.encode(TEXTS), st_minilm.encode(TEXTS))
        with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
            enc.max_seq_length = 513
    finally:
        enc.max_seq_length, st_minilm.max_seq_length = 256, 256


def test_vocab_txt_only_folder_tokenizes_like_tokenizer_json(tmp_path, minilm_encoder):
    src = minilm_dir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    plain = SentenceEncoder.load(tmp_path)
    plain.max_seq_length = minilm_encoder.max_seq_length
    for key, value in minilm_encoder.tokenize(TEXTS).items():
        assert torch.equal(plain.tokenize(TEXTS)[key], value)


def test_unsupported_folders_fail_clearly(tmp_path, tiny_st6):
    import shutil

    def variant(name):
        dst = tmp_path / name
        shutil.copytree(tiny_st6 / "st", dst)
        return dst

    cls = variant("cls")
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    with pytest.raises(SentenceModelError, match=r"1_Pooling/config.json: pooling mode \['cls'\] is not supported"):
        SentenceEncoder.load(cls)
    both = variant("both")
    (both / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}))
    with pytest.raises(SentenceModelError, match="pooling mode"):
        SentenceEncoder.load(both)
    dense = variant("dense")
    modules = json.loads((dense / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SentenceModelError, match=r"modules.json: module type 'sentence_transformers.models.Dense'"):
        SentenceEncoder.load(dense)
    with pytest.raises(SentenceModelError, match="model folder not found"):
        SentenceEncoder.load(tmp_path / "nope")


def test_model_loaded_under_inference_mode_encodes(tiny_st6):
    """Parameters created under inference_mode keep no version counter; the pack check must cope."""
    with torch.inference_mode():
        inside = SentenceEncoder.load(tiny_st6 / "st").encode(TEXTS[:4])
    outside = SentenceEncoder.load(tiny_st6 / "st").encode(TEXTS[:4])
    assert np.abs(inside - outside).max() <= 1e-6
