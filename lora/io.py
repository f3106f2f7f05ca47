"""Adapters on disk in PEFT's format, so PEFT loads ours and we load PEFT's.

A folder holds two files:
  adapter_config.json        r, lora_alpha, lora_dropout, target_modules, ... (PEFT's LoraConfig fields)
  adapter_model.safetensors  `base_model.model.<module name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)
The key prefix `base_model.model.` is PEFT's wrapper path (PeftModel.base_model = LoraModel, .model = yours);
PEFT drops the adapter name ("default") from the saved keys, and so do we.

PEFT's config grows with every release (0.21 writes ~40 fields). We read the fields that define plain LoRA,
ignore unknown or null ones, and refuse -- naming the field -- any setting that would change the math in a
way this package does not implement (DoRA, trained biases, per-layer ranks, ...), never loading it wrongly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.atomic import atomic_write_file
from core.errors import OhLoRAError
from core.jsonio import read_json
from core.unwrap import unwrap

from .config import LoRAConfig
from .inject import inject_lora, lora_layers, plan_injection

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# Fields that, when set to anything but their "off" value, change what the adapter computes or which
# weights it replaces. Off values: None, False, {}, [] (and bias "none", checked separately).
UNSUPPORTED_FIELDS = {
    "use_dora": "weight-decomposed LoRA (DoRA)",
    "lora_bias": "a trained bias in lora_B",
    "fan_in_fan_out": "Conv1D-style transposed weights",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "adapters on selected layers only",
    "exclude_modules": "excluded modules",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "quantization-aware LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
# init_lora_weights values whose adapters only work on a base whose weights PEFT rewrote at init time
# (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or that add a forward variant (MiCA).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


class AdapterError(OhLoRAError):
    """An adapter folder that cannot be loaded correctly; the message names the file and the problem."""


def adapter_config_dict(config: LoRAConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json content for `config`: what PEFT 0.21 needs, with every extra feature off."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": config.target_modules, "use_rslora": config.use_rslora,
        "init_lora_weights": config.init, "bias": "none", "fan_in_fan_out": False,
        "use_dora": False, "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                 config: LoRAConfig | None = None) -> Path:
    """Write `model`'s adapters to `folder` in PEFT's format (`config` defaults to `model.lora_config`).

    A torch.compile'd or DDP-wrapped model is unwrapped first, so the key names are the bare model's.

    Each file is written to a temporary name and renamed into place (a crash leaves the old or the new
    file, never half of one); the weights go first and the config last.
    """
    model = unwrap(model)
    config = config or getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no lora_config (use inject_lora, or pass config=)")
    tensors = {}
    for name, layer in lora_layers(model):
        if (layer.r, layer.scaling) != (config.r, config.scaling):
            raise ValueError(f"save_adapter: {name} has r={layer.r}, scale {layer.scaling:g} but the config says "
                             f"r={config.r}, scale {config.scaling:g}")
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight
            if weight.is_meta:
                raise ValueError(f"save_adapter: {name}.{part}.weight is on the meta device (no values to save)")
            tensors[f"{KEY_PREFIX}{name}.{part}.weight"] = weight.detach().to("cpu").contiguous()
    if not tensors:
        raise ValueError(f"save_adapter: {type(model).__name__} has no LoRA layers to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_file(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(adapter_config_dict(config, base_model_name_or_path), indent=2, ensure_ascii=False) + "\n"
    atomic_write_file(folder / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return folder


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple)) and len(value) == 0)


def config_from_peft_dict(d: dict[str, Any], source: str = CONFIG_NAME) -> LoRAConfig:
    """A `LoRAConfig` from a PEFT adapter_config dict; `AdapterError` naming `source` for what we cannot do."""
    def fail(message: str) -> AdapterError:
        return AdapterError(f"{source}: {message}")

    if d.get("peft_type") not in (None, "LORA"):
        raise fail(f"peft_type is {d['peft_type']!r}; only LORA adapters are supported")
    for name, what in UNSUPPORTED_FIELDS.items():
        if not _is_off(d.get(name)):
            raise fail(f"field {name!r} = {d[name]!r} ({what}) is not supported; loading it would silently "
                       f"compute something else")
    if d.get("bias") not in (None, "none"):
        raise fail(f"field 'bias' = {d['bias']!r} (trained base biases) is not supported; only 'none' is")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        if init.lower().startswith(BASE_CHANGING_INITS):
            raise fail(f"field 'init_lora_weights' = {init!r} needs base weights rewritten by PEFT or a "
                       f"different forward; not supported")
        init = True   # e.g. "eva", "orthogonal": only how A/B started, irrelevant once the weights are loaded
    for required in ("r", "lora_alpha", "target_modules"):
        if d.get(required) is None:
            raise fail(f"field {required!r} is missing")
    try:
        return LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout") or 0.0,
                          target_modules=d["target_modules"], use_rslora=bool(d.get("use_rslora") or False),
                          init=init if init is not None else True)
    except ValueError as e:
        raise fail(str(e)) from None


def adapter_base_model(folder: str | os.PathLike) -> str | None:
    """The base model an adapter records (adapter_config.json `base_model_name_or_path`; train.sft writes the
    folder or .gguf it trained on), or None. The one reader of that field: a malformed file is an AdapterError,
    a missing one FileNotFoundError, never silently no base."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config here (is {folder} a PEFT/LoRA adapter folder?)")
    named = read_json(path, AdapterError).get("base_model_name_or_path")
    if named is not None and not isinstance(named, str):
        raise AdapterError(f"{path}: base_model_name_or_path must be a string, got {named!r}")
    return named or None


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` of the adapter in `folder` (its adapter_config.json), validated."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config here (is {folder} a PEFT/LoRA adapter folder?)")
    return config_from_peft_dict(read_json(path, AdapterError), str(path))


def _listing(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | os.PathLike, *,
                 adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject LoRA into `model` as described by the adapter in `folder` and load its weights; returns `model`.

    r, alpha, dropout, targets and rsLoRA come from the adapter's own config. Everything is checked before
    the model is touched: unsupported config fields, missing or unexpected tensors, and tensor shapes.
    """
    outer, model, folder = model, unwrap(model), Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        hint = " (adapter_model.bin is a pickle; re-save it as safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_path}: adapter weights not found{hint}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise AdapterError(f"{weights_path}: cannot read ({e})") from None

    names = plan_injection(model, config, require_every_target=False)
    expected: dict[str, tuple[int, int]] = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = (config.r, base.in_features)
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = (base.out_features, config.r)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing tensors: {_listing(missing)}"] if missing else []) + \
                ([f"unexpected tensors: {_listing(unexpected)}"] if unexpected else [])
        raise AdapterError(f"{weights_path}: does not fit {type(model).__name__} with target_modules "
                           f"{config.target_modules!r}; " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)}, the model "
                               f"needs {shape} (r={config.r}); was the adapter trained on another base model?")
    bad = [key for key in expected if not bool(torch.isfinite(tensors[key]).all())]
    if bad:
        raise AdapterError(f"{weights_path}: tensor {bad[0]} holds NaN/inf values"
                           + (f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""))
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("load_adapter: the model has parameters on the meta device; load its weights first")

    inject_lora(model, config, adapter_dtype=adapter_dtype, require_every_target=False)
    for name, layer in lora_layers(model):
        layer.lora_A.weight.copy_(tensors[f"{KEY_PREFIX}{name}.lora_A.weight"])
        layer.lora_B.weight.copy_(tensors[f"{KEY_PREFIX}{name}.lora_B.weight"])
    return outer
