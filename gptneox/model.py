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

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class KVCache:
    """Keys/values of every layer for incremental decoding, filled in place by the model's forward.

    Layout per layer: (B, num_heads, capacity, head_dim); the first `length` positions are valid. Buffers are
    preallocated and grown in chunks of `chunk` positions, so a decode step writes one slot per layer instead of
    re-concatenating the whole history (cat would copy O(length) per step and allocate every step).
    """

    def __init__(self, num_layers: int, chunk: int = 256):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions already cached (advanced by the model after its last layer)
        self.chunk = chunk

    def __len__(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) after the cached positions; return all keys/values (B, nh, length+T, hd)."""
        start, end = self.length, self.length + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0] or buf_k.dtype != k.dtype:
            if buf_k is not None and buf_k.shape[0] != k.shape[0]:
                raise ValueError(f"KVCache holds batch size {buf_k.shape[0]}, got {k.shape[0]} new rows")
            capacity = math.ceil(end / self.chunk) * self.chunk
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = torch.empty_like(new_k)
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = buf_v[:, :, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (e.g. drop finished sequences, or reorder for beam search)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, rows), v.index_select(0, rows)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding (GPT-NeoX "rotate_half" style, not interleaved).

    No buffers: the fp32 table is built lazily on the device of the positions and grown on demand, so a model
    built on the meta device needs no buffer fix-up, and HF's numerics are kept (fp32 angles, cast to the
    activation dtype as HF does).
    """

    def __init__(self, dim: int, base: float, max_positions: int):
        super().__init__()
        self.dim, self.base, self.max_positions = dim, float(base), max_positions
        self._cos: torch.Tensor | None = None  # (P, dim) fp32
        self._sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        freqs = torch.arange(n, device=device).float()[:, None] * inv_freq  # (n, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, dim)
        self._cos, self._sin = emb.cos(), emb.sin()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, 1, 1, dim) in `dtype` (broadcast over heads and q/k)."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 1
        if self._cos is None or self._cos.device != position_ids.device or self._cos.shape[0] < needed:
            self._build(max(needed, self.max_positions), position_ids.device)
        cos = F.embedding(position_ids, self._cos).to(dtype)
        sin = F.embedding(position_ids, self._sin).to(dtype)
        return cos[:, :, None, None, :], sin[:, :, None, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over the two halves of x's last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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


def attention_mask_for_sdpa(attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device
                            ) -> tuple[torch.Tensor | None, bool]:
    """Return (mask, is_causal) for F.scaled_dot_product_attention; mask is bool (B|1, 1, T, past+T), True = attend.

    Without padding the cheap forms are used (is_causal for a fresh prompt, no mask for one new token).
    With padding every query may also attend to its own position, so the rows of left-padding queries (which
    see no real key) stay finite instead of NaN; those rows are padding and their outputs are ignored.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and T == 1:
        return None, False
    if not padded and past == 0:
        return None, True
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if not padded:
        return causal[None, None], False
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None], False


class GPTNeoXModel(nn.Module):
    """Embeddings + layers + final layer norm; returns normed hidden states (B, T, H)."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_ndims, config.rotary_emb_base, config.max_position_embeddings)
        self.gradient_checkpointing = False  # recompute each layer in backward (training only)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:  # count real tokens: right for left padding, as HF generate does
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_in(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype)  # (B, T, 1, 1, rd)
        mask, is_causal = attention_mask_for_sdpa(attention_mask, T, past, x.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if use_ckpt and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if self.embed_out.weight.device.type != "meta":
            self.reset_parameters()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the output projection is the input embedding matrix (one Parameter)."""
        if self.config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def _apply(self, fn, recurse=True):
        # .to()/.to_empty()/.half() visit the shared Parameter once per owner and may give each owner its own
        # copy (to_empty from meta does): re-tie afterwards.
        result = super()._apply(fn, recurse)
        self.tie_weights()
        return result

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's initialisation: normal(0, std) weights, zero biases, LayerNorm 1/0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, past + T) of 1/0 -> logits (B, T, V)."""
        return self.embed_out(self.gpt_neox(input_ids, attention_mask, position_ids, cache))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_out.weight.dtype
