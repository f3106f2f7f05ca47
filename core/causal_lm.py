"""The causal-LM contract: what infer/ (sampler), train/ (loss, loop, LoRA presets, FSDP), chat and the benches
may rely on.

Every model family (gptneox/, gemma/) follows it; nothing above the model layer probes for family attributes
such as `gpt_neox` or `embed_out`.

    h = model.hidden_states(input_ids, attention_mask, position_ids, cache)   (B, T, H) after the final norm
    z = model.logits(h)                                                       (..., V)  LM head (+ soft-cap)
    model.head                        the output Linear (H -> V) that `logits` applies (the loss fuses it)
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

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    @property
    def head(self) -> nn.Module: ...

    @property
    def logit_softcap(self) -> float | None: ...

    def new_cache(self) -> KVCache: ...

    @property
    def layers(self) -> nn.ModuleList: ...

    @property
    def family(self) -> str: ...


class DecoderBody(nn.Module):
    """What the families' bodies (embeddings + layers + final norm) share: the layer loop, recomputed in
    backward when `gradient_checkpointing` (training only), and the cache's advance after the last layer."""

    layers: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False  # recompute each layer in backward (training only)

    def run_layers(self, x: torch.Tensor, layer_inputs: Callable[[int], tuple], cache: KVCache | None
                   ) -> torch.Tensor:
        """x (B, T, H) through every layer as `layer(x, *layer_inputs(i), cache, i)`; -> (B, T, H)."""
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if use_ckpt:
                x = checkpoint(layer, x, *layer_inputs(i), None, i, use_reentrant=False)
            else:
                x = layer(x, *layer_inputs(i), cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return x


class DecoderLM(nn.Module):
    """The plumbing every family's `…ForCausalLM` shares, so the family file holds only its own math.

    A subclass sets `BODY` (the attribute holding embeddings + layers + final norm, e.g. "gpt_neox" or "model"),
    `HEAD` (the output Linear, "embed_out" / "lm_head"), `EMBEDDING` (the input table's path, tied to the head
    when `config.tie_word_embeddings`) and `LORA_TARGETS`, and calls `super().__init__(config, body)`: the head
    is made here, tied, and initialised (HF's normal(0, 0.02); norms by their own reset_parameters) unless the
    model is built on the meta device. `config.final_logit_softcapping` (Gemma 2), when set, soft-caps the
    logits."""

    BODY: str
    HEAD: str
    EMBEDDING: str
    LORA_TARGETS: tuple[str, ...] = ()

    def __init__(self, config: Any, body: nn.Module):
        super().__init__()
        self.config = config
        setattr(self, self.BODY, body)
        setattr(self, self.HEAD, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.tie_weights()
        if self.head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's initialisation: normal(0, std) Linear and Embedding weights, zero biases; every other module with
        parameters (the norms) by its own `reset_parameters`."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif module is not self and hasattr(module, "reset_parameters") and \
                    any(True for _ in module.parameters(recurse=False)):
                module.reset_parameters()

    @property
    def head(self) -> nn.Module:
        """The output Linear (H -> V), whatever the family calls it."""
        return getattr(self, self.HEAD)

    def tie_weights(self) -> None:
        """With tie_word_embeddings the output projection is the input embedding matrix (one Parameter)."""
        if self.config.tie_word_embeddings:
            self.head.weight = self.get_submodule(self.EMBEDDING).weight

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
        z = self.head(hidden)
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
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype
