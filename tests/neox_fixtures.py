"""Tiny random GPT-NeoX models and tokenizers built with the reference libraries, saved in HF format.

Shared by every test that needs a model folder: no hub, no download, a few hundred KB per model.
"""
from __future__ import annotations

from pathlib import Path

import torch

KOREAN_TEXTS = [
    "안녕! 오늘 하루는 어땠어?",
    "나는 떡볶이를 정말 좋아해. 너는 무슨 음식 좋아해?",
    "[오늘 일정: 친구랑 카페 방문] 오늘 뭐 해?",
    "오늘 친구랑 카페 가기로 했어! 너무 기대돼 (답변 종료)",
    "비 오는 날에는 집에서 영화 보는 게 최고야.",
    "Hello, Oh-LoRA! 반가워요.",
]


def save_tiny_hf_neox(folder: str | Path, *, seed: int = 0, vocab_size: int = 320, hidden_size: int = 64,
                      num_hidden_layers: int = 2, num_attention_heads: int = 4, intermediate_size: int = 128,
                      rotary_pct: float = 0.25, use_parallel_residual: bool = True,
                      tie_word_embeddings: bool = False, max_position_embeddings: int = 128,
                      max_shard_size: str | None = None) -> Path:
    """Build a random `transformers.GPTNeoXForCausalLM`, save it (safetensors) to `folder`, return the folder."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size, rotary_pct=rotary_pct,
        use_parallel_residual=use_parallel_residual, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings, bos_token_id=0, eos_token_id=2)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # HF's init leaves LayerNorm at 1/0 and small weights: perturb so tests can fail
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def train_tiny_tokenizer(folder: str | Path, texts: list[str] | None = None, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE `tokenizer.json` on Korean text (+ tokenizer_config.json naming eos/pad).

    Ids stay below 300, so it fits the default tiny model (vocab 320)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or KOREAN_TEXTS * 4, trainer=trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "bos_token": "<|endoftext|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    return folder
