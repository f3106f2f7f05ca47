"""From a checkpoint path to a model of the right family, through the family registry (core/registry.py).

    source = inspect_model(path)                             config.json parsed (or a GGUF's header peeked) once
    model, tokenizer = load_causal_lm(source, dtype, device) an HF folder of any registered family, or a GGUF file
    model = load_base_model(source, dtype, device)           the same without the tokenizer
    tokenizer = load_tokenizer(source)                       core.tokenizer.Tokenizer, for every family

The family is read from the checkpoint itself — config.json's `model_type`, or a GGUF file's
`general.architecture` — never from a user flag; no family is named here. A `ModelSource` is read once and
passed down: its parsed config.json, its config object and its opened GGUF file (whose vocabulary takes seconds
to parse) are each made once and shared by the model, the tokenizer and export. Every loader accepts a
ModelSource or a path. What comes back follows the causal-LM contract (core/causal_lm.py).

`match_checkpoint` is the strict name/shape check of an HF folder from its headers alone, for loaders that build
the model themselves (train/fsdp_model.py: on the meta device, then shard by shard).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from core.errors import OhLoRAError
from core.gguf_header import gguf_architecture, is_gguf
from core.jsonio import read_json
from core.registry import Family, family_for_gguf_architecture, family_for_model_type, gguf_families, model_types
from core.tokenizer import Tokenizer


class ModelPathError(OhLoRAError):
    """A --model path we cannot load (the message names the path or file and the problem)."""


@dataclass(frozen=True, eq=False)
class ModelSource:
    """A model checkpoint on disk: where, which format, which family; the rest is read on first use, once."""
    path: Path
    format: str                         # "hf" (config.json + safetensors) | "gguf"
    family: Family
    config_dict: dict | None = None     # config.json as parsed (HF folders)

    @property
    def model_type(self) -> str | None:
        """config.json's model_type (None for a GGUF file)."""
        return self.config_dict.get("model_type") if self.config_dict is not None else None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json" if self.format == "hf" else self.path

    @cached_property
    def config(self) -> Any:
        """The family's config object of an HF folder (from the config.json parsed by inspect_model)."""
        if self.format != "hf":
            raise ModelPathError(f"{self.path}: a GGUF file's config is read with its weights")
        return self.family.config_class.from_dict(self.config_dict, source=str(self.config_path))

    @cached_property
    def gguf(self) -> Any:
        """The opened GGUF file (parsed once: shared by the model, the tokenizer and export)."""
        return self.family.open_gguf(self.path)

    @property
    def model_class(self) -> type:
        return self.family.model_class

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The family's default LoRA targets, known before the model is built."""
        return tuple(self.family.lora_targets)


def inspect_model(path: str | os.PathLike | ModelSource) -> ModelSource:
    """Which format and family `path` is, from config.json or a GGUF header; no weights are read."""
    if isinstance(path, ModelSource):
        return path
    path = Path(path)
    if path.is_file():
        if not is_gguf(path):
            raise ModelPathError(f"{path}: not a GGUF file (a model is an HF folder with config.json, or a .gguf)")
        return ModelSource(path, "gguf", _gguf_family(path))
    if not path.is_dir():
        raise ModelPathError(f"{path}: model folder or GGUF file not found")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelPathError(f"{path}: no config.json — not an HF model folder (nor a .gguf file)")
    config = read_json(config_path, ModelPathError, expect=None)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family = family_for_model_type(model_type)
    if family is None:
        raise ModelPathError(f"{config_path}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(model_types())})")
    return ModelSource(path, "hf", family, config)


def _gguf_family(path: Path) -> Family:
    """The family reading the GGUF's general.architecture; with no readable header, the only GGUF family there
    is (its loader then says what is wrong with the file)."""
    readers = gguf_families()
    architecture = gguf_architecture(path)
    family = family_for_gguf_architecture(architecture)
    if family is not None:
        return family
    if architecture is None and len(readers) == 1:
        return readers[0]
    supported = ", ".join(a for f in readers for a in f.gguf_architectures) or "none"
    raise ModelPathError(f"{path}: GGUF general.architecture {architecture!r} is not supported "
                         f"(supported: {supported})")


def check_model_path(text: str) -> str:
    """argparse `type=` for --model: an HF folder of a supported family or a GGUF file."""
    try:
        inspect_model(text)
    except ModelPathError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def load_tokenizer(source: ModelSource | str | os.PathLike) -> Tokenizer:
    """The tokenizer of `source` (tokenizer.json + tokenizer_config.json of a folder, or a GGUF's metadata)."""
    source = inspect_model(source)
    if source.format == "hf":
        if not (source.path / "tokenizer.json").is_file():
            raise ModelPathError(f"{source.path}: no tokenizer.json next to the model")
        return Tokenizer.from_folder(source.path)
    return source.family.gguf_tokenizer(source.gguf)


def load_causal_lm(path: str | os.PathLike | ModelSource, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) from an HF folder of any registered family or a GGUF file.

    Every name and shape is checked before any weight is read; the tokenizer's ids must fit the model's
    vocabulary (a foreign tokenizer fails here, not with an IndexError mid-run)."""
    return _load(inspect_model(path), dtype, device, with_tokenizer=True)


def load_base_model(path: str | os.PathLike | ModelSource, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model alone (a folder without a tokenizer loads too: benches on random weights)."""
    return _load(inspect_model(path), dtype, device, with_tokenizer=False)[0]


def _load(source: ModelSource, dtype: torch.dtype, device, with_tokenizer: bool):
    tokenizer = None
    if source.format == "hf":
        if with_tokenizer:  # cheap, and its errors are the likelier ones: before the weights
            tokenizer = load_tokenizer(source)
        model = source.family.load_hf(source.path, dtype=dtype, device=device, config=source.config)
    else:
        model = source.family.load_gguf(source.gguf, dtype=dtype, device=device)
        tokenizer = load_tokenizer(source) if with_tokenizer else None
    if tokenizer is not None:
        tokenizer.check_fits(model.config.vocab_size, source.config_path)
        if tokenizer.eos_token_id is None:
            raise ModelPathError(f"{source.path}: the tokenizer has no eos token (tokenizer_config.json eos_token)")
    return model, tokenizer


def match_checkpoint(source: ModelSource):
    """(config, {model key: (SafetensorsFile, key in file)}) of an HF folder: every tensor name and shape
    checked against the family's model from the headers alone (as the family's own loader does)."""
    from core.safetensors_io import SafetensorsFile, match_keys, weight_files

    if source.format != "hf":
        command = source.family.gguf_convert_command
        raise ModelPathError(f"{source.path}: needs an HF safetensors folder here, not a GGUF file "
                             + (f"(convert it: {command.format(path=source.path)})" if command else
                                "(convert it to one first)"))
    files = [SafetensorsFile(p) for p in weight_files(source.path)]
    config = source.config
    with torch.device("meta"):
        state = source.model_class(config).state_dict(keep_vars=True)
    # a tied LM head is the embedding's Parameter under a second name: checkpoints store it once
    first: dict[int, str] = {}
    tied = {k for k, v in state.items() if first.setdefault(id(v), k) != k}
    expected = {k: tuple(v.shape) for k, v in state.items()}
    return config, match_keys(files, expected, source.path, optional=tied, **source.family.key_rules)
