"""Build a LoRA-injected causal LM (any family, from an HF folder) *already sharded* by FSDP2, never holding the
full base on any rank.

The plain path (`infer.models.load_causal_lm`, then `inject_lora`, then `fully_shard`) would put the whole base in
every rank's memory before sharding it — the peak that FSDP is meant to remove. Here instead:

1. the model is built on the meta device (no memory) and LoRA is injected with the same seed as the plain
   path; the adapter's initial values are computed for real on stand-in base weights that occupy one element
   each (stride-0 views), so they equal the plain path's bit for bit;
2. `apply_fsdp` shards the meta model (each of the contract's `model.layers`, then the root), `to_empty` gives every rank
   storage for its 1/N shards only;
3. the checkpoint is read one tensor at a time, each rank reading only the rows of its own shard (safetensors
   slices), so a rank's peak is its shards plus one tensor's shard.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from infer.models import ModelSource, inspect_model, match_checkpoint
from train.distributed import DistInfo, apply_fsdp, load_full_tensor


def build_fsdp_lora_model(model_dir: str | os.PathLike | ModelSource, dtype: torch.dtype, lora_config, seed: int,
                          info: DistInfo, make_root: Callable[[nn.Module], nn.Module]):
    """-> (model, root, report): `model` the family's causal LM with LoRA, `root = make_root(model)` (e.g. the
    loss module the trainer calls) sharded with FSDP2 over the ranks of `info`, `report` inject_lora's.

    Same weights as `load_causal_lm(model_dir, dtype)` + `torch.manual_seed(seed)` + `inject_lora(model, config)`.
    `model_dir` may be the ModelSource the caller inspected already (its config.json is not read again).
    """
    from core.safetensors_io import CheckpointError
    from lora import inject_lora
    from lora.inject import lora_layers, plan_injection

    source = inspect_model(model_dir)
    model_dir = source.path
    # the one strict key/shape check, from the headers, before anything is allocated
    config, found = match_checkpoint(source)
    with torch.device("meta"):
        model = source.model_class(config).to(dtype)
    model.eval()  # as load_model returns it; the trainer switches to train()

    # 1) LoRA values as the plain path makes them: stand-in base weights on the real device, 1 element each
    for name in plan_injection(model, lora_config):
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(torch.zeros((), dtype=dtype, device=info.device).expand(linear.weight.shape),
                                     requires_grad=False)
    torch.manual_seed(seed)
    report = inject_lora(model, lora_config)
    lora_init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _, layer in lora_layers(model):  # back to meta: nothing real may reach fully_shard but the adapter values
        layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=dtype, device="meta"), requires_grad=False)
    model.to("meta")

    # 2) shard the meta model, then give each rank storage for its shards only
    root = make_root(model)
    apply_fsdp(root, info, list(model.layers), sync_trainable=False)
    root.to_empty(device=info.device)

    # 3) fill the shards: checkpoint tensors one at a time, then the adapter's initial values
    params = dict(model.named_parameters())
    for path in dict.fromkeys(f.path for f, _ in found.values()):
        with safe_open(str(path), framework="pt") as f:
            for key, (owner, file_key) in found.items():
                if owner.path == path and key in params:  # a tied LM head is the embedding's Parameter
                    _load_shard(f, file_key, params[key], info.device, dtype)
    for name, value in lora_init.items():
        load_full_tensor(params[name], value)
    left = sorted(set(params) - set(found) - set(lora_init))
    if left:  # cannot happen after match_keys; guard against silently uninitialised shards
        raise CheckpointError(f"{model_dir}: parameters left unloaded: {', '.join(left[:8])}")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != sorted(lora_init):  # to("meta") / to_empty keep requires_grad; make sure of it
        raise RuntimeError("build_fsdp_lora_model: trainable parameters changed while sharding")
    return model, root, report


def _load_shard(f, file_key: str, param: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Copy checkpoint tensor `file_key` into `param`: for FSDP2's dim-0 sharding read only this rank's rows
    (torch.chunk layout, as fully_shard uses), so each rank touches 1/N of the file; else the full tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(param, DTensor) and tuple(param.placements) == (Shard(0),) and param.dim() > 0:
        world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
        rows = param.shape[0]
        chunk = -(-rows // world)
        start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        local = param.to_local()
        if local.shape[0] == stop - start:
            if stop > start:
                with torch.no_grad():
                    local.copy_(f.get_slice(file_key)[start:stop].to(device=device, dtype=dtype))
            return
    load_full_tensor(param, f.get_tensor(file_key).to(device=device, dtype=dtype))
