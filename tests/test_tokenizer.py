"""Our tokenizer wrapper vs transformers.PreTrainedTokenizerFast on a Korean byte-level BPE trained in-test."""
import json

import pytest
import torch
from neox_fixtures import KOREAN_TEXTS, train_tiny_tokenizer

from core.tokenizer import Tokenizer, TokenizerError

EXTRA = ["", "   띄어쓰기   여러 칸  ", "이모지 😀 와 한자 漢字", "<|endoftext|>가 중간에<|endoftext|>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_ids_equal_transformers_and_decode_round_trips(folder):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok = Tokenizer.from_folder(folder)
    for text in KOREAN_TEXTS + EXTRA:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert len(tok.encode(KOREAN_TEXTS[1])) > 5  # a real tokenisation, not one id per text
    assert tok.vocab_size == len(ref) == 300


def test_special_tokens_from_tokenizer_config(folder):
    tok = Tokenizer.from_folder(folder)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", tok.tokenizer.token_to_id("<|endoftext|>"))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == tok.tokenizer.token_to_id("<|pad|>") == 1
    assert tok.eos_token_id == 0
    assert tok.decode([tok.eos_token_id] + tok.encode("안녕")) == "안녕"


def test_special_tokens_map_dicts_and_pad_falls_back_to_eos(tmp_path, folder):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "lstrip": False}, "bos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.bos_token_id == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|없는토큰|>"}))
    with pytest.raises(TokenizerError, match="pad_token"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "nope")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_encode_padding_side_and_truncation(folder, side):
    tok = Tokenizer.from_folder(folder)
    texts = KOREAN_TEXTS[:3]
    rows = [tok.encode(t) for t in texts]
    ids, mask = tok.batch_encode(texts, padding_side=side)
    width = max(map(len, rows))
    assert ids.shape == mask.shape == (3, width) and ids.dtype == mask.dtype == torch.long
    for i, r in enumerate(rows):
        assert mask[i].sum().item() == len(r)
        real = ids[i][mask[i].bool()].tolist()
        assert real == r
        pads = ids[i][~mask[i].bool()]
        assert (pads == tok.pad_token_id).all()
        if len(r) < width:  # the padding sits on the requested side
            assert mask[i, 0 if side == "left" else -1].item() == 0
    ids, mask = tok.batch_encode(texts, padding_side=side, max_length=4)
    assert ids.shape == (3, 4) and mask.all() and ids[1].tolist() == rows[1][:4]
    with pytest.raises(ValueError, match="padding_side"):
        tok.batch_encode(texts, padding_side="middle")


@pytest.mark.parametrize("new_style", [False, True])
def test_special_token_precedence_matches_transformers(tmp_path, folder, new_style):
    from transformers import PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((folder / name).read_text(encoding="utf-8"), encoding="utf-8")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())  # says pad = <|pad|>
    if new_style:  # transformers >= 4.34 configs: special_tokens_map.json is then not read
        config["added_tokens_decoder"] = {"1": {"content": "<|pad|>", "special": True, "lstrip": False,
                                                "rstrip": False, "normalized": False, "single_word": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    ref = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_folder(tmp_path)
    assert (ours.pad_token, ours.pad_token_id) == (ref.pad_token, ref.pad_token_id) == \
        (("<|pad|>", 1) if new_style else ("<|endoftext|>", 0))
    assert (ours.eos_token, ours.eos_token_id) == (ref.eos_token, ref.eos_token_id)
