"""The causal-LM contract: what train/ (loss, loop, sampler, chat, LoRA presets, FSDP, benches) may rely on.

Every model family (gptneox/, gemma/) follows it; nothing above the model layer probes for family attributes
such as `gpt_neox` or `embed_out`.

    h = model.hidden_states(input_ids, attention_mask, position_ids, cache)   (B, T, H) after the final norm
    z = model.logits(h)                                                       (..., V)  LM head (+ soft-cap)
    model.logit_softcap               cap, when z = cap · tanh(head(h) / cap) (Gemma 2), else None
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



def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 cache: KVCache | None) -> tuple[int, torch.Tensor]:
    """(past length, position_ids) for a body's forward, after checking the shapes the contract promises.

    input_ids (B, T); attention_mask (B, past + T) or None. Default positions count the real tokens before each
    position — right for left padding, as HF generate does — else past, past + 1, ...  -> position_ids (B, T)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    past = cache.length if cache is not None else 0
    if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
        raise ValueError(f"attention_mask must be (batch, past + new) = {(B, past + T)}, "
                         f"got {tuple(attention_mask.shape)}")
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        else:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    return past, position_ids

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


class DecoderLM(nn.Module):
    """The plumbing every family's `…ForCausalLM` shares, so the family file holds only its own math.

    A subclass sets `BODY` (the attribute holding embeddings + layers + final norm, e.g. "gpt_neox" or "model"),
    `HEAD` (the output Linear, "embed_out" / "lm_head"), `EMBEDDING` (the input table's path, tied to the head
    when `config.tie_word_embeddings`) and `LORA_TARGETS`. `config.final_logit_softcapping` (Gemma 2), when set,
    soft-caps the logits."""

    BODY: str
    HEAD: str
    EMBEDDING: str
    LORA_TARGETS: tuple[str, ...] = ()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the output projection is the input embedding matrix (one Parameter)."""
        if self.config.tie_word_embeddings:
            getattr(self, self.HEAD).weight = self.get_submodule(self.EMBEDDING).weight

    def _apply(self, fn, recurse=True):
        # .to()/.to_empty()/.half() visit the shared Parameter once per owner and may give each owner its own
        # copy (to_empty from meta does): re-tie afterwards.
        result = super()._apply(fn, recurse)
        self.tie_weights()
        return result

    @property
    def family(self) -> str:
        return self.config.model_type

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, H)."""
        return getattr(self, self.BODY)(input_ids, attention_mask, position_ids, cache)

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V), soft-capped (cap · tanh(z / cap)) when the family does."""
        z = getattr(self, self.HEAD)(hidden)
        cap = self.logit_softcap
        return z if cap is None else torch.tanh(z / cap) * cap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, past + T) of 1/0 -> logits (B, T, V)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self, self.BODY).layers

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self, self.BODY).gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        getattr(self, self.BODY).gradient_checkpointing = bool(value)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return getattr(self, self.HEAD).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.HEAD).weight.dtype
