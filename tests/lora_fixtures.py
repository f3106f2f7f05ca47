"""Helpers shared by the tests/test_lora_*.py files: give adapters non-zero values, copy them into PEFT."""
from __future__ import annotations

import torch
from torch import nn

from lora import lora_layers


@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 123, std: float = 0.05) -> None:
    """Overwrite every lora_A / lora_B with random values (B non-zero, so the adapter changes the logits)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for w in (layer.lora_A.weight, layer.lora_B.weight):
            w.copy_(torch.randn(w.shape, generator=g) * std)


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name + '.lora_A.weight' / '.lora_B.weight': tensor} of our model."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def peft_lora_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The same keys read from a PEFT model (strips 'base_model.model.' and the adapter name 'default')."""
    return {k.removeprefix("base_model.model.").replace(".default.", "."): v.detach()
            for k, v in peft_model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def copy_lora_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Copy our adapter weights into the PEFT model's (same module names); every one must have a partner."""
    mine = lora_state(ours)
    params = dict(peft_model.named_parameters())
    for key, value in mine.items():
        module, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        params[f"base_model.model.{module}.{part}.default.weight"].copy_(value)
    assert len(mine) == len(peft_lora_state(peft_model)), "adapter sets differ"
