"""Load and save GPT-NeoX model folders in Hugging Face format (config.json + safetensors), never pickle.

Keys are the HF checkpoint's own names (our modules are named like HF's), so loading is a 1:1 copy:
`gpt_neox.embed_in.weight`, `gpt_neox.layers.{i}.{input_layernorm,post_attention_layernorm}.{weight,bias}`,
`gpt_neox.layers.{i}.attention.{query_key_value,dense}.{weight,bias}`,
`gpt_neox.layers.{i}.mlp.{dense_h_to_4h,dense_4h_to_h}.{weight,bias}`, `gpt_neox.final_layer_norm.{weight,bias}`,
`embed_out.weight` (absent when tie_word_embeddings: then it is embed_in's matrix).

Loading is lean (core.safetensors_io): the module is built on the meta device (no random weights), each tensor
is read from its shard with plain file reads (no mmap) and cast to the requested dtype on the way, then assigned
(`load_state_dict(assign=True)`); peak memory stays near one copy of the weights in the target dtype.
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

from .config import GPTNeoXConfig
from .model import GPTNeoXForCausalLM

# Buffers old checkpoints carry that are not weights (recomputed by the model): ignored when loading.
IGNORED_KEY = re.compile(r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
KEY_ALIASES = {"lm_head.weight": "embed_out.weight"}  # transformers 5.x's in-memory name for embed_out
__all__ = ["CheckpointError", "load_model", "save_pretrained", "expected_shapes", "IGNORED_KEY", "KEY_ALIASES"]


def expected_shapes(config: GPTNeoXConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for `config` (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPTNeoXForCausalLM(config).state_dict().items()}


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", config: GPTNeoXConfig | None = None) -> GPTNeoXForCausalLM:
    """Build GPTNeoXForCausalLM from an HF folder (config.json + model.safetensors or sharded safetensors).

    Returns the model in eval mode, weights in `dtype` on `device`. Missing/unexpected keys or shape mismatches
    raise CheckpointError listing all of them. `config`: the folder's config when the caller has read it already.
    """
    folder = Path(folder)
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    config = config or GPTNeoXConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    optional = {"embed_out.weight"} if config.tie_word_embeddings else set()
    # every key and shape is checked from the headers before any data is read
    found = match_keys(files, expected_shapes(config), folder, aliases=KEY_ALIASES, ignored=IGNORED_KEY,
                       optional=optional)
    return assign_state(model, read_state(found, dtype, device), folder)


def save_pretrained(model: GPTNeoXForCausalLM, folder: str | os.PathLike,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write `folder` in HF format (config.json + model.safetensors, or shards + index above max_shard_size).

    transformers.GPTNeoXForCausalLM.from_pretrained loads the result. A new folder appears only when complete
    (written beside it, then renamed); in an existing folder each file is replaced atomically and stale weight
    files of an earlier save are removed. Other files (tokenizer, adapters) are left alone.
    """
    folder = Path(folder)
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    expected = expected_shapes(config)
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{folder}: model has parameters that are not GPT-NeoX weights "
                              f"(merge or remove adapters first): {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    if config.tie_word_embeddings:
        state.pop("embed_out.weight", None)  # one matrix, stored once as embed_in (as HF does)
    hf_config = config.to_hf_dict(dtype=dtype_name(model.dtype))
    config_text = json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n"

    return save_folder(state, folder, {"config.json": config_text}, max_shard_size)
