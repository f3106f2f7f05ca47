"""Gemma-2 / Gemma-3 (text) in plain PyTorch, with module names equal to the HF checkpoint's keys.

    input_ids (B, T)
      -> model.embed_tokens * sqrt(H)  (the scale rounded to the activation dtype, as HF does)   (B, T, H)
      -> N x GemmaDecoderLayer (layer_types[i]: "sliding_attention" or "full_attention"):
           a = self_attn(input_layernorm(x))      GQA; Gemma 3: q_norm / k_norm per head; rotary with the local
                                                  base on sliding layers, the global base (+ linear scaling)
                                                  on full ones; scores * query_pre_attn_scalar^-0.5; Gemma 2:
                                                  scores soft-capped; sliding layers see the last window keys
           x = x + post_attention_layernorm(a)
           x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))     GeGLU (tanh GELU)
      -> model.norm                                                                              (B, T, H)
      -> lm_head (tied to embed_tokens), Gemma 2: logits soft-capped                             (B, T, V)

Every RMSNorm is computed in fp32 with weight (1 + w) and cast back (HF's Gemma numerics). `state_dict()` keys
are the HF file's keys (`model.layers.3.self_attn.q_proj.weight`, ...), so loading is a 1:1 copy (load.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.causal_lm import DecoderBody, DecoderLM, check_inputs
from core.kv_cache import KVCache
from core.masks import attention_mask_for_sdpa
from core.rotary import RotaryEmbedding, apply_rotary

from .config import GemmaConfig


def activation(name: str):
    """HF ACT2FN names -> functions: every Gemma uses the tanh approximation (gelu_pytorch_tanh)."""
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_activation {name!r}")


class _RMSNormFunction(torch.autograd.Function):
    """y = x̂ · (1 + w), x̂ = x · r, r = 1 / sqrt(mean(x²) + eps), in fp32, y cast back to x's dtype.

    Autograd through the plain expression keeps three fp32 copies of x per norm (Gemma runs six norms per layer:
    ~0.8 MB per token of a bf16 270M fine-tune); this saves x as it is and r (one value per row), and gives
        ∂L/∂x = r · (g - x̂ · mean(g · x̂)),  g = ∂L/∂y · (1 + w);   ∂L/∂w = Σ_rows ∂L/∂y · x̂."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)             # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (h * r * (1.0 + weight.float())).type_as(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        x_hat, grad_y = x.float() * r, grad_y.float()
        g = grad_y * (1.0 + weight.float())
        grad_x = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.type_as(x) if grad_x is not None else None, grad_w, None


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32, cast back to x's dtype. w is stored zero-centred (HF and Google's keys)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()  # a scale of 1 + 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           scale: float, softcap: float | None) -> torch.Tensor:
    """q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd). SDPA unless scores are soft-capped (Gemma 2),
    which SDPA cannot do: then explicit scores, grouped per KV head (no repeated K/V), softmax in fp32 as HF."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    qg = q.view(B, nkv, nh // nkv, T, hd)
    scores = (qg @ k[:, :, None].transpose(-1, -2)) * scale  # (B, nkv, g, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:  # (B|1, 1, T, S) -> (B|1, 1, 1, T, S), or (T, S)
        scores = scores.masked_fill(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, nh, T, hd)


class GemmaAttention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.sliding = config.layer_types[layer] == "sliding_attention"
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.use_qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, key_start: int, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # cos/sin (B, T, 1, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        if cache is not None:  # (B, nkv, T, hd) -> (B, nkv, past + T, hd)
            k, v = cache.update(layer, k, v)
        if key_start:  # sliding layer past its window: keys no query of this step can see are left out
            k, v = k[:, :, key_start:], v[:, :, key_start:]
        y = attend(q, k, v, mask, is_causal, self.scale, self.softcap)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class GemmaMLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(H, eps)
        self.post_attention_layernorm = GemmaRMSNorm(H, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(H, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(H, eps)

    def forward(self, x, cos, sin, mask, is_causal, key_start, cache, layer):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, key_start, cache, layer)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(DecoderBody):
    """Scaled embeddings + layers + final norm; returns normed hidden states (B, T, H)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # Gemma 3: local base on sliding layers, global base (+ scaling) on full ones; Gemma 2: one table for all
        self.rotary_global = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling_factor)
        self.rotary_local = RotaryEmbedding(config.head_dim, config.rope_local_base_freq)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        past, position_ids = check_inputs(input_ids, attention_mask, position_ids, cache)
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # (B, T, H)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        tables = {}
        for kind, rotary in (("full_attention", self.rotary_global), ("sliding_attention", self.rotary_local)):
            if kind in self.config.layer_types:
                cos, sin = rotary(position_ids, x.dtype)  # (B, T, 1, 1, hd)
                tables[kind] = cos[:, :, :, 0], sin[:, :, :, 0]  # (B, T, 1, hd): broadcast over heads
        masks = {"full_attention": (*attention_mask_for_sdpa(attention_mask, T, past, x.device), 0)}
        if "sliding_attention" in self.config.layer_types:
            # keys before the first one the earliest new query can see are dropped: the mask is built for the
            # shifted problem, which is the same (the window depends on distances only)
            start = max(0, past - self.config.sliding_window + 1)
            sub = attention_mask[:, start:] if attention_mask is not None else None
            masks["sliding_attention"] = (*attention_mask_for_sdpa(sub, T, past - start, x.device,
                                                                   self.config.sliding_window), start)
        kinds = self.config.layer_types
        # each layer gets its kind's (cos, sin) and (mask, is_causal, key start)
        x = self.run_layers(x, lambda i: (*tables[kinds[i]], *masks[kinds[i]]), cache)
        return self.norm(x)


class GemmaForCausalLM(DecoderLM):
    """Gemma body + LM head tied to the embeddings; init, tying, head, soft-capped logits: core.causal_lm."""
    BODY, HEAD, EMBEDDING = "model", "lm_head", "model.embed_tokens"  # the contract's plumbing: core/causal_lm.py
    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, config: GemmaConfig):
        super().__init__(config, GemmaModel(config))
