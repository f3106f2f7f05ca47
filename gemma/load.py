"""Load Gemma models from HF folders (config.json + safetensors, never pickle) or GGUF files; save HF folders.

HF keys are our module names, so a folder loads 1:1: `model.embed_tokens.weight`, `model.norm.weight`,
`model.layers.{i}.{input_layernorm,post_attention_layernorm,pre_feedforward_layernorm,post_feedforward_layernorm}
.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{i}.self_attn.{q,k}_norm.weight`
(Gemma 3), `model.layers.{i}.mlp.{gate,up,down}_proj.weight`; `lm_head.weight` only when not tied. Multimodal
Gemma-3 folders load their language model (`language_model.model.*` in 4.x files, `model.language_model.*` in
5.x ones); the vision tower is skipped.

Both paths build the module on the meta device, check every name and shape before reading data, read tensor by
tensor in the target dtype (core.safetensors_io / gguf_io) and assign (`load_state_dict(assign=True)`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from core.dtypes import dtype_name
from core.safetensors_io import (CheckpointError, SafetensorsFile, assign_state, match_keys, read_state,
                                 save_folder, weight_files)

from .config import GemmaConfig
from .gguf_io import GGUFFile
from .model import GemmaForCausalLM

# Buffers some checkpoints carry that are not weights, and a multimodal checkpoint's vision half: skipped.
IGNORED_KEY = re.compile(r"(^|\.)(rotary_emb\.\w*inv_freq|embed_scale)$|(^|\.)(vision_tower|multi_modal_projector)\.")
MULTIMODAL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("language_model.lm_head.", "lm_head."))
__all__ = ["CheckpointError", "load_model", "load_gguf", "load_pretrained", "save_pretrained", "expected_shapes"]


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for `config` (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GemmaForCausalLM(config).state_dict().items()}


def _text_key(key: str) -> str:
    for old, new in MULTIMODAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", config: GemmaConfig | None = None) -> GemmaForCausalLM:
    """GemmaForCausalLM from an HF folder (config.json + model.safetensors or shards), eval mode, in `dtype`.
    `config`: the folder's config when the caller has read it already."""
    folder = Path(folder)
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    config = config or GemmaConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    found = match_keys(files, expected_shapes(config), folder, ignored=IGNORED_KEY, optional=optional,
                       rename=_text_key)
    return assign_state(model, read_state(found, dtype, device), folder)


def load_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> GemmaForCausalLM:
    """GemmaForCausalLM from a Gemma-2/3 GGUF file, every tensor dequantised to `dtype` (eval mode).

    `path` may be an already opened GGUFFile (opening parses the whole vocabulary: share it with the tokenizer)."""
    f = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    config = f.config()
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = f.read_state(dtype, expected_shapes(config), optional)
    return assign_state(model, {k: v.to(device) for k, v in state.items()}, f.path)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> GemmaForCausalLM:
    """An HF folder or a GGUF file, whichever `path` is."""
    return load_gguf(path, dtype, device) if Path(path).is_file() else load_model(path, dtype, device)


def save_pretrained(model: GemmaForCausalLM, folder: str | os.PathLike, max_shard_size: int | str = "2GB",
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write `folder` in HF format (config.json + model.safetensors, or shards + index above max_shard_size),
    plus `extra_files` (name -> text, e.g. the tokenizer's). transformers' Gemma2ForCausalLM / Gemma3ForCausalLM
    load the result. Atomic: a new folder appears only when complete; in an existing one each file is replaced
    atomically (core.safetensors_io.save_folder)."""
    folder = Path(folder)
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    unexpected = [k for k in state if k not in expected_shapes(config)]
    if unexpected:
        raise CheckpointError(f"{folder}: model has parameters that are not Gemma weights "
                              f"(merge or remove adapters first): {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one matrix, stored once as embed_tokens (as HF does)
    texts = {"config.json": json.dumps(config.to_hf_dict(dtype=dtype_name(model.dtype)), indent=2,
                                       ensure_ascii=False) + "\n"}
    texts.update(extra_files or {})
    return save_folder(state, folder, texts, max_shard_size)
