"""The bare model inside the wrappers that rename its parameters, so saved keys are always the model's own."""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DistributedDataParallel / DataParallel wrappers (their names add a prefix).

    FSDP2 shards in place and needs no unwrapping."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):           # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
