"""The causal-LM contract: what train/ (loss, loop, sampler, chat, LoRA presets, FSDP, benches) may rely on.

Every model family (gptneox/, gemma/) follows it; nothing above the model layer probes for family attributes
such as `gpt_neox` or `embed_out`.

    h = model.hidden_states(input_ids, attention_mask, position_ids, cache)   (B, T, H) after the final norm
    z = model.logits(h)                                                       (..., V)  LM head (+ soft-cap)
    z = model(input_ids, attention_mask, position_ids, cache)                 = logits(hidden_states(...))
    cache = model.new_cache()                                                 filled in place by forward
    model.layers                      the transformer blocks (FSDP wraps each; gradient checkpointing unit)
    model.gradient_checkpointing      recompute each block in backward (training only)
    model.config.vocab_size, model.config.num_hidden_layers
    model.LORA_TARGETS                the family's default LoRA target Linear names (suffixes)
    model.family                      "gpt_neox" | "gemma2" | "gemma3_text" ...: the config's model_type
    model.device, model.dtype, model.num_parameters()

`attention_mask` is (B, past + T) of 1/0 (left or right padding); `position_ids` default to the count of real
tokens before each position, so left padding decodes as HF's generate does.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from core.kv_cache import KVCache


@runtime_checkable
class CausalLM(Protocol):
    config: Any
    LORA_TARGETS: tuple[str, ...]
    gradient_checkpointing: bool

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self) -> KVCache: ...

    @property
    def layers(self) -> nn.ModuleList: ...

    @property
    def family(self) -> str: ...
