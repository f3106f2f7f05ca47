"""bert.encoder: token-level parity with transformers' BertModel/RobertaModel, key layouts, loading errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from bert.encoder import BertEncoder, EncoderConfig, EncoderLoadError, init_weights, load_encoder
from bert.tokenizer import SentenceTokenizer
from tests.sbert_fixtures import SBERT_TEXTS, minilm_dir, save_tiny_hf_encoder


def _hf_hidden(folder, features):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(**features).last_hidden_state


def _assert_close_on_real_tokens(ours, ref, mask, atol):
    real = mask.bool()
    assert ours.shape == ref.shape
    assert (ours[real] - ref[real]).abs().max().item() <= atol


@pytest.mark.parametrize("model_type,head", [("roberta", ""), ("roberta", "mlm"), ("bert", ""), ("bert", "mlm")])
def test_tiny_encoder_matches_transformers(tmp_path, model_type, head):
    """Right-padded batch of mixed lengths: RoBERTa positions must skip pads (start at padding_idx + 1)."""
    folder = save_tiny_hf_encoder(tmp_path / "m", model_type=model_type, head=head)
    ours = load_encoder(folder)
    assert ours.config.model_type == model_type and (ours.pooler is not None) == (head == "")
    tok = SentenceTokenizer.from_folder(folder, model_type=model_type, max_seq_length=32)
    features = tok(SBERT_TEXTS)
    assert features["attention_mask"].sum(1).min() < features["attention_mask"].shape[1]  # padding present
    if model_type == "roberta":
        assert "token_type_ids" not in features and (features["input_ids"][features["attention_mask"] == 0] == 1).all()
    ref = _hf_hidden(tmp_path / "m" if head == "" else _bare_copy(tmp_path, folder, model_type), features)
    with torch.no_grad():
        _assert_close_on_real_tokens(ours(**features), ref, features["attention_mask"], atol=1e-5)


def _bare_copy(tmp_path, folder, model_type):
    """…ForMaskedLM folder -> the same weights as a bare Bert/RobertaModel through transformers itself."""
    from transformers import AutoModel

    AutoModel.from_pretrained(str(folder)).save_pretrained(tmp_path / "bare")
    return tmp_path / "bare"


def test_roberta_position_ids():
    config = EncoderConfig(model_type="roberta", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16, max_position_embeddings=12, pad_token_id=1)
    emb = BertEncoder(config).embeddings
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    assert emb.position_ids(ids).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    assert config.max_positions == 10
    bert = BertEncoder(EncoderConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=12)).embeddings
    assert bert.position_ids(ids).tolist() == [list(range(6))] * 2


def test_minilm_token_states_match_transformers():
    folder = minilm_dir()
    ours = load_encoder(folder)
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.pooler is not None) == (384, 6, True)
    tok = SentenceTokenizer.from_folder(folder, model_type="bert", max_seq_length=128)
    features = tok(SBERT_TEXTS)
    with torch.no_grad():
        _assert_close_on_real_tokens(ours(**features), _hf_hidden(folder, features), features["attention_mask"],
                                     atol=1e-4)


def test_train_mode_dropout_and_gradients(tmp_path):
    ours = load_encoder(save_tiny_hf_encoder(tmp_path / "m", model_type="bert"))
    tok = SentenceTokenizer.from_folder(tmp_path / "m", model_type="bert", max_seq_length=32)
    features = tok(SBERT_TEXTS[:3])
    with torch.no_grad():
        a, b = ours(**features), ours(**features)
    assert torch.equal(a, b)  # eval: deterministic
    ours.train()
    out = ours(**features)
    assert (out - a).abs().max() > 1e-3  # dropout 0.1 active in train mode
    out.sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    assert grads["pooler.dense.weight"] is None  # frozen: unused by mean pooling
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("pooler"))


def test_init_weights_is_seeded():
    config = EncoderConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=16)
    a, b = init_weights(BertEncoder(config), seed=3), init_weights(BertEncoder(config), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.embeddings.LayerNorm.weight.eq(1).all() and a.encoder.layer[0].output.dense.bias.eq(0).all()


def test_loading_errors(tmp_path):
    folder = save_tiny_hf_encoder(tmp_path / "m", model_type="bert")
    config = json.loads((folder / "config.json").read_text())

    def variant(name, **changes):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        (dst / "config.json").write_text(json.dumps({**config, **changes}))
        return dst

    with pytest.raises(EncoderLoadError, match="model_type 'gpt2' is not supported"):
        load_encoder(variant("gpt2", model_type="gpt2"))
    with pytest.raises(EncoderLoadError, match=r"shape mismatch: embeddings.word_embeddings.weight \(200, 32\) \(expected \(201, 32\)\)"):
        load_encoder(variant("shape", vocab_size=config["vocab_size"] + 1))
    with pytest.raises(EncoderLoadError, match=r"missing: encoder.layer.2"):
        load_encoder(variant("layers", num_hidden_layers=3))
    with pytest.raises(EncoderLoadError, match="position_embedding_type 'relative_key'"):
        load_encoder(variant("rel", position_embedding_type="relative_key"))
    binonly = variant("bin")
    (binonly / "model.safetensors").rename(binonly / "pytorch_model.bin")
    with pytest.raises(EncoderLoadError, match="only pickle weights"):
        load_encoder(binonly)
    with pytest.raises(EncoderLoadError, match="config.json not found"):
        load_encoder(tmp_path)
    from safetensors.torch import load_file, save_file

    extra = variant("extra")
    state = load_file(str(extra / "model.safetensors"))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(state, str(extra / "model.safetensors"))
    with pytest.raises(EncoderLoadError, match=r"unexpected: encoder.layer.0.attention.self.rotary.weight"):
        load_encoder(extra)
