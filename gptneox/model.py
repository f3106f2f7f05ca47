"""GPT-NeoX (Polyglot-Ko) in plain PyTorch, with module names equal to the HF checkpoint's keys.

    input_ids (B, T)
      -> gpt_neox.embed_in                                   (B, T, H)
      -> N x GPTNeoXLayer:
           a = attention(input_layernorm(x))                 fused per-head QKV, rotary on the first
                                                             rotary_ndims dims of each head, causal SDPA
           parallel:   x = x + a + mlp(post_attention_layernorm(x))
           sequential: x = x + a;  x = x + mlp(post_attention_layernorm(x))
      -> gpt_neox.final_layer_norm                            (B, T, H)
      -> embed_out                                            (B, T, V)

`state_dict()` keys are exactly the HF file's keys (`gpt_neox.layers.3.attention.query_key_value.weight`,
`embed_out.weight`, ...), so loading and saving is a 1:1 copy (see load.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.causal_lm import DecoderBody, DecoderLM, check_inputs
from core.kv_cache import KVCache
from core.masks import attention_mask_for_sdpa
from core.rotary import RotaryEmbedding, apply_rotary

from .config import GPTNeoXConfig


def activation(name: str):
    """HF ACT2FN names -> functions. gelu_new/gelu_fast/gelu_pytorch_tanh are all the tanh approximation."""
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, what Polyglot-Ko uses
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported hidden_act {name!r}")


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.rotary_ndims = (config.num_attention_heads, config.head_dim,
                                                            config.rotary_ndims)
        # output features laid out per head as (num_heads, 3, head_dim): [q_h, k_h, v_h] for each head h
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, H = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)
        rd = self.rotary_ndims
        qk = qkv[:, :, :, :2]  # (B, T, nh, 2, hd): q and k rotated together
        if rd == self.head_dim:
            qk = apply_rotary(qk, cos, sin)
        elif rd > 0:
            qk = torch.cat((apply_rotary(qk[..., :rd], cos, sin), qk[..., rd:]), dim=-1)
        q, k, v = qk[:, :, :, 0].transpose(1, 2), qk[:, :, :, 1].transpose(1, 2), qkv[:, :, :, 2].transpose(1, 2)
        if cache is not None:  # (B, nh, T, hd) -> (B, nh, past + T, hd)
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, T, hd)
        return self.dense(y.transpose(1, 2).reshape(B, T, H))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache, layer):
        a = self.attention(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer)
        if self.use_parallel_residual:  # same summation order as HF: mlp + attn + x
            return self.mlp(self.post_attention_layernorm(x)) + a + x
        x = a + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(DecoderBody):
    """Embeddings + layers + final layer norm; returns normed hidden states (B, T, H)."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_ndims, config.rotary_emb_base)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        past, position_ids = check_inputs(input_ids, attention_mask, position_ids, cache)
        T = input_ids.shape[1]
        x = self.embed_in(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, T, 1, 1, rd)
        mask, is_causal = attention_mask_for_sdpa(attention_mask, T, past, x.device)
        x = self.run_layers(x, lambda i: (cos, sin, mask, is_causal), cache)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(DecoderLM):
    """GPT-NeoX body + untied (or tied) output projection; init, tying, head, logits: core.causal_lm.DecoderLM."""
    BODY, HEAD, EMBEDDING = "gpt_neox", "embed_out", "gpt_neox.embed_in"  # the contract's plumbing: core/causal_lm.py
    LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    family = "gpt_neox"

    def __init__(self, config: GPTNeoXConfig):
        super().__init__(config, GPTNeoXModel(config))
