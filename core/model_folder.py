"""An HF model folder of any family's causal LM: the load and save every family shares, written once.

    expected_state(model_class, config)            checkpoint key -> shape, and the keys of tied weights
    load_model_folder(model_class, config, folder) built on the meta device, every name and shape checked from the
                                                   headers, then read tensor by tensor in the target dtype
    save_model_folder(model, folder, family_name)  config.json (`config.to_hf_dict`) + safetensors, atomically

A family's load.py passes its key rules (aliases of old names, ignored buffers, renamed prefixes: see
core.safetensors_io.match_keys); a tied LM head is the embedding's Parameter under a second name, which
checkpoints store once, so it is optional on load and dropped on save.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from core.dtypes import dtype_name
from core.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    assign_state,
    match_keys,
    read_state,
    save_folder,
    weight_files,
)


def expected_state(model_class: type, config: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(key -> shape, tied keys) of `model_class(config)`, built on the meta device: nothing allocated."""
    with torch.device("meta"):
        state = model_class(config).state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = {k for k, v in state.items() if first.setdefault(id(v), k) != k}
    return {k: tuple(v.shape) for k, v in state.items()}, tied


def match_folder(model_class: type, config: Any, folder: str | os.PathLike, **key_rules
                 ) -> dict[str, tuple[SafetensorsFile, str]]:
    """{model key: (file, key in file)} of `folder`, every name and shape checked against the model."""
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    expected, tied = expected_state(model_class, config)
    return match_keys(files, expected, folder, optional=tied, **key_rules)


def load_model_folder(model_class: type, config: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", **key_rules) -> torch.nn.Module:
    """`model_class(config)` with the weights of `folder`, in eval mode, in `dtype` on `device`; missing,
    unexpected or misshapen tensors raise CheckpointError listing all of them before any data is read.
    `config` may be a function reading it: called once the weight files are found (their absence is the
    likelier problem, and is reported first)."""
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    config = config() if callable(config) else config
    expected, tied = expected_state(model_class, config)
    found = match_keys(files, expected, folder, optional=tied, **key_rules)
    with torch.device("meta"):
        model = model_class(config)
    return assign_state(model, read_state(found, dtype, device), folder)


def save_model_folder(model: torch.nn.Module, folder: str | os.PathLike, family_name: str,
                      max_shard_size: int | str = "2GB", extra_files: dict[str, str] | None = None) -> Path:
    """Write `folder` in HF format: config.json (`model.config.to_hf_dict(dtype=...)`) + model.safetensors, or
    shards + index above max_shard_size, + `extra_files` (name -> text). A model with parameters the family does
    not have (an unmerged adapter) is refused. Atomic (core.safetensors_io.save_folder)."""
    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    expected, tied = expected_state(type(model), model.config)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{folder}: model has parameters that are not {family_name} weights "
                              f"(merge or remove adapters first): {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    for key in tied:
        state.pop(key, None)  # one matrix, stored once under its first name (as HF does)
    texts = {"config.json": json.dumps(model.config.to_hf_dict(dtype=dtype_name(model.dtype)), indent=2,
                                       ensure_ascii=False) + "\n"}
    texts.update(extra_files or {})
    return save_folder(state, folder, texts, max_shard_size)
