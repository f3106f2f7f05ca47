"""Gemma-2 / Gemma-3 hyper-parameters, read from (and written to) a Hugging Face `config.json`.

Three `model_type`s load: `gemma2`, `gemma3_text` (text-only checkpoints such as gemma-3-270m / 1b) and `gemma3`
(the multimodal checkpoints: only `text_config` is read). Both config dialects load:

* transformers 4.x: `rope_theta` (+ `rope_local_base_freq`, `rope_scaling` for Gemma 3), and either
  `layer_types` or the older `sliding_window_pattern` (Gemma 3: every 6th layer global) / nothing (Gemma 2:
  alternating local, global);
* transformers 5.x: `rope_parameters` (Gemma 3: one dict per layer type).

Absent keys take transformers' class defaults (the family's published values, e.g. `query_pre_attn_scalar` 256,
local rope base 10k, global 1M), as `from_pretrained` does: real Gemma-3 `text_config`s leave many keys out. The
shape-defining keys must be given; a wrong default elsewhere in the shape is caught by the loader's shape check.
`to_hf_dict()` writes the 4.x keys with `layer_types` spelled out, which both generations read.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import OhLoRAError
from core.jsonio import config_json_path, read_json


class ConfigError(OhLoRAError):
    """A `config.json` (or GGUF metadata) we cannot turn into a GemmaConfig (the message names the source and key)."""


MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")  # see model.py `activation`
LAYER_TYPES = ("sliding_attention", "full_attention")
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
KNOWN_ARCHITECTURES = {"Gemma2ForCausalLM", "Gemma2Model", "Gemma3ForCausalLM", "Gemma3TextModel",
                       "Gemma3ForConditionalGeneration", "Gemma3Model"}

# transformers' class defaults (Gemma2Config / Gemma3TextConfig in transformers 5.24), applied to absent keys
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(vocab_size=256000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                   query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=2,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None),
}


def default_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Every `pattern`-th layer global, the others sliding (Gemma 2: pattern 2, Gemma 3: pattern 6)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


@dataclass
class GemmaConfig:
    model_type: str  # "gemma2" | "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str] = field(default_factory=list)  # per layer: "sliding_attention" | "full_attention"
    sliding_window: int = 4096  # a sliding layer's query sees itself and the window - 1 keys before it
    query_pre_attn_scalar: float = 256  # attention scores are scaled by query_pre_attn_scalar ** -0.5
    rope_theta: float = 10000.0  # rotary base of the global (full_attention) layers
    rope_local_base_freq: float = 10000.0  # rotary base of the sliding layers (Gemma 2: the same as rope_theta)
    rope_scaling_factor: float = 1.0  # linear rope scaling (positions / factor) on the global layers only
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            pattern = DEFAULTS.get(self.model_type, DEFAULTS["gemma2"])["sliding_window_pattern"]
            self.layer_types = default_layer_types(self.num_hidden_layers, pattern)
        self.validate()

    @property
    def use_qk_norm(self) -> bool:
        """Gemma 3 RMS-normalises each head's query and key (q_norm / k_norm); Gemma 2 does not."""
        return self.model_type == "gemma3_text"

    def validate(self, source: str = "GemmaConfig") -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {self.model_type!r} is not supported "
                              f"(supported: gemma2, gemma3_text, gemma3)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even (rotary embedding)")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"{source}: layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"{source}: layer type {bad[0]!r} is not supported (only {', '.join(LAYER_TYPES)})")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_activation {self.hidden_activation!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        for name in ("rope_theta", "rope_local_base_freq", "rope_scaling_factor", "query_pre_attn_scalar",
                     "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value > 0 and math.isfinite(value)):
                raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (value > 0 and math.isfinite(value))):
                raise ConfigError(f"{source}: {name} must be a positive number or null, got {value!r}")

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "GemmaConfig":
        """Read an HF Gemma-2 / Gemma-3 config dict (either dialect); `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or []
        unknown = [a for a in archs if a not in KNOWN_ARCHITECTURES]
        if unknown:
            raise ConfigError(f"{source}: architecture {unknown[0]!r} is not supported "
                              f"(only Gemma2ForCausalLM, Gemma3ForCausalLM and Gemma3's text part)")
        model_type = d.get("model_type")
        if model_type == "gemma3":  # multimodal: the language model's config is text_config
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'gemma3' without a text_config object")
            d = {"tie_word_embeddings": d.get("tie_word_embeddings"), **text, "model_type": "gemma3_text"}
            model_type, source = "gemma3_text", f"{source} (text_config)"
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: gemma2, gemma3_text, gemma3)")
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: missing required key {missing[0]!r}"
                              + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
        for key, bad in (("attention_bias", True), ("use_bidirectional_attention", True)):
            if d.get(key) is bad:
                raise ConfigError(f"{source}: {key}={bad} is not supported")
        defaults = DEFAULTS[model_type]

        def get(key: str) -> Any:
            value = d.get(key)
            return defaults.get(key) if value is None else value

        rope_theta, local_base, factor = _rope(d, model_type, defaults, source)
        layer_types = d.get("layer_types")
        if layer_types is None:
            pattern = get("sliding_window_pattern")
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
                raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}")
            if isinstance(d["num_hidden_layers"], bool) or not isinstance(d["num_hidden_layers"], int):
                raise ConfigError(f"{source}: num_hidden_layers must be a positive integer, "
                                  f"got {d['num_hidden_layers']!r}")
            layer_types = default_layer_types(d["num_hidden_layers"], pattern)
        elif not isinstance(layer_types, list):
            raise ConfigError(f"{source}: layer_types must be a list, got {layer_types!r}")
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):  # HF allows a list; the first one is the end-of-text token
            eos = eos[0] if eos else None
        softcap = {k: (d[k] if k in d else defaults[k]) for k in ("attn_logit_softcapping",
                                                                 "final_logit_softcapping")}
        if model_type == "gemma3_text":  # transformers' Gemma 3 attention never applies it: nor do we
            softcap["attn_logit_softcapping"] = None
        config = cls.__new__(cls)
        config.__dict__.update(
            model_type=model_type, vocab_size=get("vocab_size"), hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=get("num_attention_heads"), num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"), layer_types=list(layer_types), sliding_window=get("sliding_window"),
            query_pre_attn_scalar=get("query_pre_attn_scalar"), rope_theta=rope_theta,
            rope_local_base_freq=local_base, rope_scaling_factor=factor, **softcap,
            max_position_embeddings=get("max_position_embeddings"), rms_norm_eps=get("rms_norm_eps"),
            hidden_activation=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(True if d.get("tie_word_embeddings") is None else d["tie_word_embeddings"]),
            bos_token_id=d.get("bos_token_id", 2), eos_token_id=eos, pad_token_id=d.get("pad_token_id", 0))
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GemmaConfig":
        """Read `config.json` (a file, or a model folder holding one)."""
        path = config_json_path(path)
        return cls.from_dict(read_json(path, ConfigError, expect=None), source=str(path))

    # ---- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """An HF `config.json` dict that transformers 4.x and 5.x both load (4.x rope keys, explicit layer_types)."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]]}
        d.update(self.to_dict())
        scaling = d.pop("rope_scaling_factor")
        local = d.pop("rope_local_base_freq")
        if self.model_type == "gemma3_text":
            d["rope_local_base_freq"] = local
            d["rope_scaling"] = {"rope_type": "linear", "factor": scaling} if scaling != 1.0 else None
        d.update(attention_bias=False, attention_dropout=0.0, use_cache=True)
        if dtype is not None:
            d["torch_dtype"] = dtype  # 4.x spelling; 5.x reads it too
        return d


def _rope(d: dict[str, Any], model_type: str, defaults: dict[str, Any], source: str) -> tuple[float, float, float]:
    """(global base, local base, linear scaling factor of the global layers) from either dialect."""
    theta, local, scaling = d.get("rope_theta"), d.get("rope_local_base_freq"), d.get("rope_scaling")
    rope = d.get("rope_parameters")
    if rope is not None:  # transformers 5.x
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object, got {rope!r}")
        if model_type == "gemma3_text" and ("full_attention" in rope or "sliding_attention" in rope):
            full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        else:  # one set for every layer (Gemma 2)
            full = sliding = rope
        theta = full.get("rope_theta", theta)
        local = sliding.get("rope_theta", local)
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_type {sliding['rope_type']!r} on sliding layers is not supported")
        scaling = full if full.get("rope_type", "default") != "default" else None
    theta = float(defaults["rope_theta"] if theta is None else theta)
    if model_type == "gemma2":
        if scaling:
            raise ConfigError(f"{source}: rope scaling {scaling!r} is not supported for gemma2")
        return theta, theta, 1.0  # Gemma 2 has one rotary table for all layers
    local = float(defaults["rope_local_base_freq"] if local is None else local)
    factor = 1.0
    if scaling:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "default"):
            raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (only 'linear')")
        if kind == "linear":
            factor = scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ConfigError(f"{source}: rope scaling factor must be a positive number, got {factor!r}")
            factor = float(factor)
    return theta, local, factor
