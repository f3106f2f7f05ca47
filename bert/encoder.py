"""A hand-written BERT / RoBERTa encoder whose parameter names equal HF transformers' `BertModel`/`RobertaModel`.

    embeddings: word + position + token_type -> LayerNorm            (B, T, H)
    N x layer:  x = LN(x + Wo·SDPA(Wq x, Wk x, Wv x, padding mask))   post-LN, as BERT
                x = LN(x + W2·act(W1 x))
    (optional pooler.dense: loaded and saved back unchanged, never used — sentence embeddings mean-pool)

BERT positions are 0..T-1. RoBERTa positions start at padding_idx + 1 and skip pad tokens:
`position = cumsum(input_ids != pad) * (input_ids != pad) + pad` (HF's `create_position_ids_from_input_ids`).

Loading (`load_encoder`) is lean (meta device + `assign=True`, no double allocation), reads safetensors only,
accepts the bare (`embeddings.…`) and prefixed (`bert.…` / `roberta.…`) key layouts, ignores known non-weights
(`embeddings.position_ids`, `embeddings.token_type_ids`) and pre-training heads (`cls.…`, `lm_head.…`), and
fails on any other missing or unexpected key.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.safetensors_io import CheckpointError, SafetensorsFile, match_keys, read_state, weight_files
from core.jsonio import read_json
from core.onednn import FUSED_ACTIVATIONS, PackCache, invalidate_packs, plain_linear, use_fast_path

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ROBERTA_TYPES = ("roberta", "xlm-roberta")  # XLM-R is RoBERTa's architecture: same positions, pad id 1
HF_ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
# Keys a checkpoint may hold that are not weights of the encoder we build: buffers and pre-training heads.
IGNORED_KEY = re.compile(r"(^embeddings\.(position_ids|token_type_ids)$)|^(cls|lm_head|classifier|qa_outputs)\.")


class EncoderLoadError(CheckpointError):
    """A model folder that cannot be loaded: the message names the file and the problem."""


@dataclass
class EncoderConfig:
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1  # dropout is active only in train mode, where HF applies it
    attention_probs_dropout_prob: float = 0.1
    position_embedding_type: str = "absolute"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other config.json keys, saved back as-is

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        """Longest input the position table allows (RoBERTa spends padding_idx + 1 rows on offsets)."""
        if self.model_type in ROBERTA_TYPES:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "EncoderConfig":
        model_type = d.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EncoderLoadError(f"{source}: model_type {model_type!r} is not supported "
                                   f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderLoadError(f"{source}: position_embedding_type {d['position_embedding_type']!r} is not "
                                   "supported (only 'absolute')")
        names = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        if "pad_token_id" not in kwargs and model_type in ROBERTA_TYPES:
            kwargs["pad_token_id"] = 1
        config = cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EncoderLoadError(f"{source}: {name} must be a positive integer, got {value!r}")
        for name in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise EncoderLoadError(f"{source}: {name} must be a number in [0, 1), got {value!r}")
        if isinstance(config.pad_token_id, bool) or not isinstance(config.pad_token_id, int):
            raise EncoderLoadError(f"{source}: pad_token_id must be an integer, got {config.pad_token_id!r}")
        if config.hidden_size % config.num_attention_heads:
            raise EncoderLoadError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                                   f"num_attention_heads {config.num_attention_heads}")
        if config.hidden_act not in ACTIVATIONS:
            raise EncoderLoadError(f"{source}: hidden_act {config.hidden_act!r} is not supported "
                                   f"(supported: {', '.join(ACTIVATIONS)})")
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EncoderConfig":
        path = Path(path)
        if not path.is_file():
            raise EncoderLoadError(f"{path}: config.json not found")
        return cls.from_dict(read_json(path, EncoderLoadError), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({k: v for k, v in asdict(self).items() if k != "extra"})
        d["architectures"] = [HF_ARCHITECTURES[self.model_type]]
        return d


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu,
               "silu": F.silu, "swish": F.silu}


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids: Tensor) -> Tensor:
        B, T = input_ids.shape
        if self.config.model_type in ROBERTA_TYPES:  # count real tokens only; pads sit at padding_idx
            pad = self.config.pad_token_id
            not_pad = input_ids.ne(pad).int()
            return (torch.cumsum(not_pad, dim=1) * not_pad).long() + pad
        return torch.arange(T, device=input_ids.device).expand(B, T)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        # input_ids (B, T) -> (B, T, H)
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds the model's "
                             f"{self.config.max_positions} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(self.position_ids(input_ids)))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.packed_qkv = PackCache()  # inference-only packed copy of the stacked q, k, v weights

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        B, T, H = x.shape
        # one GEMM for q, k, v (their weights stacked: (3H, H)), then (B, T, H) -> (B, nh, T, hd) each
        qkv = (self.packed_qkv((self.query, self.key, self.value), x) if use_fast_path(self, x)
               else plain_linear((self.query, self.key, self.value), x))  # (B, T, 3H)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.split(H, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, H)


class Dense(nn.Module):
    """LayerNorm(dropout(dense(h)) + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.packed = PackCache()

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        if use_fast_path(self, h):
            return self.LayerNorm(self.packed((self.dense,), h, residual=residual))  # residual add fused into the GEMM
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = Dense(config.hidden_size, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, attn_mask), x)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_name, self.act = config.hidden_act, ACTIVATIONS[config.hidden_act]
        self.packed = PackCache()

    def forward(self, x: Tensor) -> Tensor:
        if use_fast_path(self, x):
            if self.act_name in FUSED_ACTIVATIONS:
                return self.packed((self.dense,), x, act=self.act_name)  # GELU fused into the GEMM
            return self.act(self.packed((self.dense,), x))
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Dense(config.intermediate_size, config)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class LayerStack(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class Pooler(nn.Module):
    """HF's BertPooler weights (tanh(W h_cls)); kept only so a checkpoint round-trips. Not used by forward."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class BertEncoder(nn.Module):
    """`BertEncoder(config, with_pooler)(input_ids, attention_mask, token_type_ids) -> (B, T, H)` hidden states."""

    def __init__(self, config: EncoderConfig, with_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(config)
        self.pooler = Pooler(config) if with_pooler else None
        if self.pooler is not None:
            self.pooler.requires_grad_(False)  # unused by mean pooling: keep it out of the optimizer
        # new weights -> drop the packed copies (optimizer steps: core.onednn.invalidate_on_step)
        self.register_load_state_dict_post_hook(lambda module, _keys: invalidate_packs(module))

    def _apply(self, fn, recurse=True):  # .to() / .half() / .to_empty() replace the weights
        result = super()._apply(fn, recurse)
        invalidate_packs(self)
        return result

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        # input_ids, attention_mask, token_type_ids: (B, T); attention_mask 1 = real token, 0 = pad
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # (B, 1, 1, T) boolean: every query may attend to the real keys of its row. Skipped when nothing is
            # padded so SDPA can take its fastest unmasked path.
            attn_mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, attn_mask)
        return x


def load_encoder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> BertEncoder:
    """Load a HF BERT/RoBERTa folder (config.json + model.safetensors) into a `BertEncoder` in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderLoadError(f"{folder}: model folder not found")
    config = EncoderConfig.from_json(folder / "config.json")
    # …ForMaskedLM checkpoints prefix the encoder keys with the base model's name (`bert.` / `roberta.`)
    prefix = "bert." if config.model_type == "bert" else "roberta."
    rename = lambda key: key.removeprefix(prefix)  # noqa: E731
    try:
        files = [SafetensorsFile(path) for path in weight_files(folder)]
        with_pooler = any(rename(k) == "pooler.dense.weight" for f in files for k in f.keys())
        with torch.device("meta"):
            model = BertEncoder(config, with_pooler=with_pooler)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = match_keys(files, expected, folder, ignored=IGNORED_KEY, rename=rename)
        state = read_state(found, None, device)
    except (CheckpointError, FileNotFoundError) as e:
        raise EncoderLoadError(str(e)) from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_encoder_weights(model: BertEncoder, path: str | os.PathLike) -> None:
    """Write the encoder's weights (HF BertModel names, contiguous fp tensors) as one safetensors file.

    A model without pooler weights (e.g. from a …ForMaskedLM checkpoint such as klue/roberta-base) gets a zero
    `pooler.dense`, so transformers' BertModel/RobertaModel loads the file without reporting missing weights;
    the pooler is never used by mean pooling."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.pooler is None:
        H, dtype = model.config.hidden_size, model.embeddings.word_embeddings.weight.dtype
        state["pooler.dense.weight"] = torch.zeros(H, H, dtype=dtype)
        state["pooler.dense.bias"] = torch.zeros(H, dtype=dtype)
    save_file(state, str(path), metadata={"format": "pt"})


def init_weights(model: BertEncoder, std: float = 0.02, seed: int | None = None) -> BertEncoder:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorms) for a fresh model."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


__all__ = ["EncoderConfig", "EncoderLoadError", "BertEncoder", "load_encoder", "save_encoder_weights",
           "init_weights"]
