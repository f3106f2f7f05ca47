"""torch.distributed set-up for `torchrun`; a no-op for a plain single-process run.

Every trainer calls `init_distributed()` once and asks the returned `DistInfo` who writes files
(`info.is_main`). Nothing here re-implements a collective: it is torch.distributed as it is.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None, timeout_s: float = 300.0) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or return a 1-process DistInfo.

    `timeout_s` bounds every collective, so a dead rank ends the others with an error instead of a hang.
    """
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not launched_by_torchrun():
        return DistInfo(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over ranks (e.g. loss·count and count for an exact global mean)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's disjoint share of `items`, the same count on every rank (the tail that does not divide is dropped)."""
    per_rank = len(items) // world_size if world_size > 1 else len(items)
    return [items[i] for i in range(rank, per_rank * world_size, world_size)] if world_size > 1 else list(items)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
