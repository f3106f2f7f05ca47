"""Put LoRA adapters into any model by module name, count what became trainable, and merge them back out.

`inject_lora` swaps each matching `nn.Linear` for a `LoRALinear` that shares the Linear's own weight and bias
(nothing is copied, so it works on the meta device too), and freezes every other parameter.
`merge_lora` does the reverse: each `LoRALinear` becomes a plain `nn.Linear` holding W + s·B·A.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from core.unwrap import unwrap

from .config import LoRAConfig
from .layer import LoRALinear


@dataclass
class LoRAReport:
    """What `inject_lora` did: the wrapped module names and the parameter counts after injection."""
    wrapped: list[str]
    trainable: int   # parameters with requires_grad (= the LoRA A and B matrices)
    total: int       # all parameters of the model, adapters included (tied weights counted once)
    config: LoRAConfig

    def __str__(self) -> str:
        kinds = Counter(name.rsplit(".", 1)[-1] for name in self.wrapped)
        where = ", ".join(f"{kind} ×{n}" for kind, n in kinds.items())
        c = self.config
        scale = f"α/√r = {c.scaling:g}" if c.use_rslora else f"α/r = {c.scaling:g}"
        return (f"LoRA r={c.r}, alpha={c.alpha:g} ({scale}) on {len(self.wrapped)} Linear modules: {where}\n"
                f"trainable parameters: {self.trainable:,} of {self.total:,} "
                f"({100.0 * self.trainable / max(self.total, 1):.2f}%)")


def target_matches(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry matches the name or its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def abbreviate_names(names: list[str], limit: int = 12) -> str:
    """'gpt_neox.layers.0.mlp.dense_h_to_4h', 'gpt_neox.layers.1.mlp…' -> 'gpt_neox.layers.*.mlp.dense_h_to_4h'."""
    patterns = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names))
    shown = ", ".join(patterns[:limit])
    return shown + (f", … ({len(patterns) - limit} more)" if len(patterns) > limit else "") if patterns else "(none)"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRALinear in `model`."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def plan_injection(model: nn.Module, config: LoRAConfig, *, require_every_target: bool = True) -> list[str]:
    """Names of the Linear modules `inject_lora` would wrap; raises if the targets do not fit the model."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("inject_lora: the model already has LoRA layers (merge_lora it first)")
    targets = config.target_modules
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    matched = [n for n in modules if n and target_matches(n, targets)]

    def no_match(what: str) -> ValueError:
        return ValueError(f"inject_lora: {what} matches no module of {type(model).__name__}; its Linear modules "
                          f"are: {abbreviate_names(linear_names)}")

    if isinstance(targets, str):
        if not matched:
            raise no_match(f"target regex {targets!r}")
    else:
        unmatched = [t for t in targets if not any(target_matches(n, [t]) for n in matched)]
        if unmatched and (require_every_target or len(unmatched) == len(targets)):
            raise no_match(f"target_modules {unmatched}")
    not_linear = [n for n in matched if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ValueError(f"inject_lora: target_modules match {not_linear[0]!r}, a "
                         f"{type(modules[not_linear[0]]).__name__}; LoRA wraps nn.Linear modules only "
                         f"(Linear modules here: {abbreviate_names(linear_names)})")
    return matched


def inject_lora(model: nn.Module, config: LoRAConfig, *, adapter_dtype: torch.dtype | None = None,
                require_every_target: bool = True) -> LoRAReport:
    """Wrap every `nn.Linear` of `model` whose name matches `config.target_modules` in a `LoRALinear`, in place.

    Every pre-existing parameter is frozen (requires_grad=False); only the new lora_A / lora_B weights train.
    `adapter_dtype`: dtype of A and B (default: the base dtype widened to at least fp32).
    `require_every_target`: each suffix in the list must match something (a typo is an error); loading a
    PEFT adapter relaxes this to "at least one", as PEFT does. The config is kept as `model.lora_config`
    (for `save_adapter`).
    """
    model = unwrap(model)   # wrap the real modules; names and `lora_config` are the bare model's
    matched = plan_injection(model, config, require_every_target=require_every_target)
    model.requires_grad_(False)
    for name in matched:
        base = model.get_submodule(name)
        layer = LoRALinear(base, r=config.r, alpha=config.alpha, dropout=config.dropout,
                           use_rslora=config.use_rslora, init=config.init, adapter_dtype=adapter_dtype)
        _replace(model, name, layer.train(base.training))   # an eval() model stays in eval mode (no dropout)
    model.lora_config = config
    params = list(model.parameters())
    return LoRAReport(wrapped=matched, trainable=sum(p.numel() for p in params if p.requires_grad),
                      total=sum(p.numel() for p in params), config=config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and return the model with plain `nn.Linear`s (in place).

    Afterwards the model has exactly the base model's modules and state_dict keys (ready for
    `gptneox.load.save_pretrained`) and costs nothing extra at inference. Parameters keep their
    requires_grad flags (the base stays frozen).
    """
    if isinstance(model, LoRALinear):
        return model.to_linear()
    inner = unwrap(model)
    for name, layer in list(lora_layers(inner)):
        _replace(inner, name, layer.to_linear())
    inner.__dict__.pop("lora_config", None)
    return model
