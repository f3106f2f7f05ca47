"""GPT-NeoX hyper-parameters, read from (and written to) a Hugging Face `config.json`.

Two dialects of `config.json` exist in the wild and both load:

* legacy (transformers 4.x, e.g. the real EleutherAI/polyglot-ko-1.3b download): `rotary_pct`,
  `rotary_emb_base`, and possibly no `use_parallel_residual` (HF's default, True, applies);
* transformers 5.x: `rope_parameters: {"partial_rotary_factor": ..., "rope_theta": ..., "rope_type": "default"}`.

`to_hf_dict()` writes the legacy keys with `use_parallel_residual` spelled out, which both generations read.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from core.errors import OhLoRAError
from core.jsonio import config_json_path, read_json


class ConfigError(OhLoRAError):
    """A `config.json` we cannot turn into a GPTNeoXConfig (the message names the file and the key)."""


# Activation names HF's ACT2FN maps to functions we implement (see model.py `activation`).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")

# Keys a config must give: HF's own defaults for these describe GPT-NeoX-20B, never what a folder means.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary position embedding
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residuals
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """How many leading dims of each head are rotated (HF: int(head_dim * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct)

    def validate(self, source: str = "GPTNeoXConfig") -> None:
        for name in REQUIRED_KEYS + ("max_position_embeddings",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if not 0.0 <= float(self.rotary_pct) <= 1.0:
            raise ConfigError(f"{source}: rotary_pct must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_ndims % 2:
            raise ConfigError(f"{source}: rotary dims int(head_dim * rotary_pct) = {self.rotary_ndims} must be even")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if not (float(self.rotary_emb_base) > 0 and math.isfinite(float(self.rotary_emb_base))):
            raise ConfigError(f"{source}: rotary_emb_base must be a positive number, got {self.rotary_emb_base!r}")

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "GPTNeoXConfig":
        """Read either dialect of an HF GPT-NeoX config dict; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "gpt_neox")
        if model_type != "gpt_neox":
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported (only 'gpt_neox')")
        archs = d.get("architectures") or []
        unknown = [a for a in archs if a not in ("GPTNeoXForCausalLM", "GPTNeoXModel")]
        if unknown:
            raise ConfigError(f"{source}: architecture {unknown[0]!r} is not supported (only GPTNeoXForCausalLM)")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}"
                              + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
        if d.get("attention_bias", True) is not True:
            raise ConfigError(f"{source}: attention_bias=false is not supported (GPT-NeoX checkpoints have biases)")
        if d.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling {d['rope_scaling']!r} is not supported")

        rotary_pct, rotary_base = d.get("rotary_pct"), d.get("rotary_emb_base")
        rope = d.get("rope_parameters")
        if rope is not None:  # transformers 5.x dialect
            if not isinstance(rope, dict):
                raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type {rope['rope_type']!r} is not supported")
            for legacy, new, value in (("rotary_pct", "partial_rotary_factor", rotary_pct),
                                       ("rotary_emb_base", "rope_theta", rotary_base)):
                if value is not None and new in rope and float(rope[new]) != float(value):
                    raise ConfigError(f"{source}: {legacy}={value} disagrees with rope_parameters.{new}={rope[new]}")
            rotary_pct = rope.get("partial_rotary_factor", rotary_pct)
            rotary_base = rope.get("rope_theta", rotary_base)

        def get(key: str, default: Any) -> Any:
            value = d.get(key)
            return default if value is None else value

        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):  # HF allows a list; the first one is the end-of-text token
            eos = eos[0] if eos else None
        try:
            config = cls.__new__(cls)
            config.__dict__.update(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                rotary_pct=float(0.25 if rotary_pct is None else rotary_pct),
                rotary_emb_base=float(10000.0 if rotary_base is None else rotary_base),
                max_position_embeddings=get("max_position_embeddings", 2048),
                layer_norm_eps=float(get("layer_norm_eps", 1e-5)),
                use_parallel_residual=bool(get("use_parallel_residual", True)),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                hidden_act=get("hidden_act", "gelu"),
                bos_token_id=d.get("bos_token_id", 0), eos_token_id=eos)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad value: {e}") from None
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPTNeoXConfig":
        """Read `config.json` (a file, or a model folder holding one)."""
        path = config_json_path(path)
        return cls.from_dict(read_json(path, ConfigError, expect=None), source=str(path))

    # ---- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """An HF `config.json` dict that transformers 4.x and 5.x both load (legacy rotary keys)."""
        d: dict[str, Any] = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}
        d.update({f.name: getattr(self, f.name) for f in fields(self)})
        d.update(attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0, use_cache=True)
        if dtype is not None:
            d["torch_dtype"] = dtype  # 4.x spelling; 5.x reads it too
        return d

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def polyglot_ko_1_3b(cls) -> "GPTNeoXConfig":
        """EleutherAI/polyglot-ko-1.3b (1,331,810,304 parameters)."""
        return cls(vocab_size=30080, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=8192, rotary_pct=0.5, rotary_emb_base=10000.0, max_position_embeddings=2048,
                   layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
                   bos_token_id=0, eos_token_id=0)  # as in the real download's config.json
