"""From a checkpoint path to a model of the right family: the one place above the model packages that knows
which families exist.

    model, tokenizer = load_causal_lm(path, dtype, device)   an HF folder (GPT-NeoX or Gemma-2/3) or a .gguf file
    model = load_base_model(path, dtype, device)             the same without the tokenizer
    source = inspect_model(path)                             cheap: format, family package, model_type

The family is read from the checkpoint itself — config.json's `model_type`, or a GGUF file (only Gemma has a
GGUF loader; the file's `general.architecture` is checked when it is read) — never from a user flag. What comes
back follows the causal-LM contract (core/causal_lm.py), and the tokenizer is `gptneox.tokenizer.Tokenizer`'s
interface (encode / decode / batch_encode / eos_token_id / pad_token_id) for every family.

`match_checkpoint` is the strict name/shape check of an HF folder from its headers alone, for loaders that build
the model themselves (train/fsdp_model.py: on the meta device, then shard by shard).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import OhLoRAError
from core.jsonio import read_json

# config.json model_type -> the package that implements it
HF_FAMILIES = {"gpt_neox": "gptneox", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma"}
GGUF_MAGIC = b"GGUF"


class ModelPathError(OhLoRAError):
    """A --model path we cannot load (the message names the path or file and the problem)."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    format: str            # "hf" (config.json + safetensors) | "gguf"
    package: str           # "gptneox" | "gemma"
    model_type: str | None  # config.json's model_type; None for a GGUF until it is read

    @property
    def model_class(self) -> type:
        if self.package == "gptneox":
            from gptneox.model import GPTNeoXForCausalLM
            return GPTNeoXForCausalLM
        from gemma.model import GemmaForCausalLM
        return GemmaForCausalLM

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The family's default LoRA targets (the contract's LORA_TARGETS), known before the model is built."""
        return tuple(self.model_class.LORA_TARGETS)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def inspect_model(path: str | os.PathLike) -> ModelSource:
    """Which format and family `path` is, from config.json or the GGUF magic; nothing heavy is read."""
    path = Path(path)
    if path.is_file():
        if not _is_gguf(path):
            raise ModelPathError(f"{path}: not a GGUF file (a model is an HF folder with config.json, or a .gguf)")
        return ModelSource(path, "gguf", "gemma", None)
    if not path.is_dir():
        raise ModelPathError(f"{path}: model folder or GGUF file not found")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelPathError(f"{path}: no config.json — not an HF model folder (nor a .gguf file)")
    config = read_json(config_path, ModelPathError, expect=None)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_FAMILIES:
        raise ModelPathError(f"{config_path}: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(HF_FAMILIES)})")
    return ModelSource(path, "hf", HF_FAMILIES[model_type], model_type)


def check_model_path(text: str) -> str:
    """argparse `type=` for --model: an HF folder of a supported family or a GGUF file."""
    try:
        inspect_model(text)
    except ModelPathError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _family_errors(source: ModelSource) -> tuple[type[Exception], ...]:
    """The family's input errors that are not OhLoRAErrors yet (gemma's ConfigError / TokenizerError are plain
    ValueErrors): re-raised as ModelPathError so CLIs print them in one line."""
    if source.package != "gemma":
        return ()
    from gemma.config import ConfigError
    from gemma.tokenizer import TokenizerError
    return tuple(c for c in (ConfigError, TokenizerError) if not issubclass(c, OhLoRAError))


def load_tokenizer(source: ModelSource, gguf_file: Any = None):
    """The tokenizer of `source` (tokenizer.json + tokenizer_config.json of a folder, or a GGUF's metadata)."""
    from gptneox.tokenizer import Tokenizer

    if source.format == "hf":
        if not (source.path / "tokenizer.json").is_file():
            raise ModelPathError(f"{source.path}: no tokenizer.json next to the model")
        return Tokenizer.from_folder(source.path)
    from gemma.gguf_io import GGUFFile
    from gemma.tokenizer import special_tokens, tokenizer_from_gguf

    f = gguf_file or GGUFFile.open(source.path)
    names = special_tokens(f)
    return Tokenizer(tokenizer_from_gguf(f), eos_token=names["eos_token"], pad_token=names["pad_token"],
                     bos_token=names["bos_token"], source=str(source.path))


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from an HF folder of either family or a Gemma GGUF file.

    Every name and shape is checked before any weight is read; the tokenizer's ids must fit the model's
    vocabulary (a foreign tokenizer fails here, not with an IndexError mid-run)."""
    return _load(inspect_model(path), dtype, device, with_tokenizer=True)


def load_base_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model alone (a folder without a tokenizer loads too: benches on random weights)."""
    return _load(inspect_model(path), dtype, device, with_tokenizer=False)[0]


def _load(source: ModelSource, dtype: torch.dtype, device, with_tokenizer: bool):
    tokenizer = None
    try:
        if source.format == "hf":
            if with_tokenizer:  # cheap, and its errors are the likelier ones: before the weights
                tokenizer = load_tokenizer(source)
            if source.package == "gptneox":
                from gptneox.load import load_model
            else:
                from gemma.load import load_model
            model = load_model(source.path, dtype=dtype, device=device)
        else:
            from gemma.gguf_io import GGUFFile
            from gemma.load import load_gguf
            f = GGUFFile.open(source.path)  # parses the whole vocabulary once: shared by model and tokenizer
            model = load_gguf(f, dtype=dtype, device=device)
            tokenizer = load_tokenizer(source, f) if with_tokenizer else None
    except _family_errors(source) as e:
        raise ModelPathError(str(e)) from None
    if tokenizer is not None:
        tokenizer.check_fits(model.config.vocab_size,
                             source.path / "config.json" if source.format == "hf" else source.path)
        if tokenizer.eos_token_id is None:
            raise ModelPathError(f"{source.path}: the tokenizer has no eos token (tokenizer_config.json eos_token)")
    return model, tokenizer


def match_checkpoint(source: ModelSource):
    """(config, {model key: (SafetensorsFile, key in file)}) of an HF folder: every tensor name and shape
    checked against the family's model from the headers alone (as the family's own loader does)."""
    from core.safetensors_io import SafetensorsFile, match_keys, weight_files

    if source.format != "hf":
        raise ModelPathError(f"{source.path}: needs an HF safetensors folder here, not a GGUF file "
                             f"(convert it: python -m gemma.convert {source.path} OUT_DIR)")
    files = [SafetensorsFile(p) for p in weight_files(source.path)]
    try:
        if source.package == "gptneox":
            from gptneox.config import GPTNeoXConfig as Config
            from gptneox.load import IGNORED_KEY, KEY_ALIASES
            keys = dict(aliases=KEY_ALIASES, ignored=IGNORED_KEY)
        else:
            from gemma.config import GemmaConfig as Config
            from gemma.load import IGNORED_KEY, _text_key
            keys = dict(ignored=IGNORED_KEY, rename=_text_key)
        config = Config.from_json(source.path / "config.json")
    except _family_errors(source) as e:
        raise ModelPathError(str(e)) from None
    with torch.device("meta"):
        state = source.model_class(config).state_dict(keep_vars=True)
    # a tied LM head is the embedding's Parameter under a second name: checkpoints store it once
    first: dict[int, str] = {}
    tied = {k for k, v in state.items() if first.setdefault(id(v), k) != k}
    expected = {k: tuple(v.shape) for k, v in state.items()}
    return config, match_keys(files, expected, source.path, optional=tied, **keys)
