"""torch.distributed set-up for `torchrun`; a no-op for a plain single-process run.

Every trainer calls `init_distributed()` once and asks the returned `DistInfo` who writes files
(`info.is_main`). Nothing here re-implements a collective, a process pool or a sharding scheme: it is
torch.distributed as it is — DDP (`wrap_ddp`), FSDP2 (`apply_fsdp`, `torch.distributed.fsdp.fully_shard`) and
DTensor (`full_tensor`, `distribute_tensor`) — plus the glue a trainer needs around them:

* `distributed_session()`   init + teardown (`destroy_process_group`) on exit and on error; a collective that
                            fails because a rank died or hung ends this rank with one clear line, exit 1
                            (`fail_fast_on_collective_error` alone for a CLI that inits elsewhere);
* timeouts                  every collective is bounded by `OHLORA_DIST_TIMEOUT` seconds (default 600), so a
                            hung rank ends the others instead of hanging them forever;
* `shard`                   each rank's disjoint share of an epoch's batch list, the same count on every rank;
                            positions are kept in *global* batches, so a resume may change the world size;
* `grad_sync`, `mean_grad_factor` gradient accumulation without needless syncs, and the loss normalisation that
                            makes N ranks × B examples equal one process with the N·B examples;
* `full_trainable_params`, `full_optimizer_state_dict`, `load_full_tensor`, `load_optimizer_state_dict`
                            FSDP-sharded (DTensor) parameters and optimizer state ⇄ plain full tensors, so
                            checkpoints written by N ranks load in M ranks (or one process) and vice versa;
* `on_main(info, fn)`       rank-0-only writes; the other ranks wait and learn whether it worked;
"""
from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from core.unwrap import unwrap

T = TypeVar("T")

TIMEOUT_ENV = "OHLORA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
EXIT_PEER_LOST = 1


class DistributedError(RuntimeError):
    """A collective failed (a rank died, hung past the timeout, or rank 0 could not write)."""


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


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_timeout_s(timeout_s: float | None = None) -> float:
    """`timeout_s`, else $OHLORA_DIST_TIMEOUT, else 600 s."""
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r}: must be > 0 seconds")
    return value


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or return a 1-process DistInfo.

    `timeout_s` (default $OHLORA_DIST_TIMEOUT or 600 s) bounds every collective, so a hung rank ends the others
    with an error instead of a hang (gloo raises; NCCL's watchdog aborts). Calling it again returns the same
    DistInfo. On CUDA the group also has a gloo side, so small CPU collectives (`all_reduce_sum`, objects) work.
    """
    want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not launched_by_torchrun():
        return DistInfo(device=torch.device(device or ("cuda" if want_cuda else "cpu")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=collective_timeout_s(timeout_s))
        if want_cuda:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group. Garbage-collect first: a DDP wrapper left in a reference cycle keeps the gloo
    group's threads alive until interpreter exit, where tearing them down can abort the process (SIGABRT,
    "terminate called without an active exception") after an otherwise successful run."""
    if is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()
        _slow_groups.clear()


def describe_failure(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a collective that failed because another rank died or hung."""
    if isinstance(exc, DistributedError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    markers = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe",
               "gloo", "NCCL", "nccl", "DistBackendError", "DistNetworkError", "peer")
    if not (isinstance(exc, (RuntimeError, ConnectionError, OSError)) and any(m in text for m in markers)):
        return None
    rank = dist.get_rank() if is_initialized() else os.environ.get("RANK", "?")
    return (f"rank {rank}: a collective operation failed — another rank died or stopped responding "
            f"(timeout {collective_timeout_s():g} s, set ${TIMEOUT_ENV} to change it). Cause: {first[:300]}")


@contextmanager
def fail_fast_on_collective_error() -> Iterator[None]:
    """If the body fails because a collective broke (a rank died, or hung past the timeout), print one clear
    line to stderr and end this process with exit code 1 right away: tearing down a broken group can block,
    and the other ranks (or torchrun) must see this rank gone rather than wait on it. Other errors pass."""
    try:
        yield
    except BaseException as exc:
        message = describe_failure(exc) if is_initialized() and dist.get_world_size() > 1 else None
        if message is not None:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)
        raise


@contextmanager
def torn_down() -> Iterator[None]:
    """The body of a command that may run under torchrun (train.sft, sbert.train): a dead or hung rank ends it
    with one clear line (exit 1, no hang), and the process group is torn down however it ends."""
    try:
        with fail_fast_on_collective_error():
            yield
    finally:
        cleanup()


@contextmanager
def distributed_session(device: str | None = None, timeout_s: float | None = None) -> Iterator[DistInfo]:
    """`with distributed_session() as info:` — init, then always tear down (destroy_process_group), with
    `fail_fast_on_collective_error` around the body."""
    info = init_distributed(device, timeout_s)
    with torn_down():
        yield info


# ------------------------------------------------------------------------------------ small collectives
def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few floats over ranks (e.g. loss·count and count for an exact global mean), in float64."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small objects: RNG states, counters)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_slow_groups: dict[float, Any] = {}


def _group_with_timeout(timeout_s: float):
    """A gloo group over all ranks whose collectives wait up to `timeout_s` (made once, by all ranks)."""
    if timeout_s not in _slow_groups:
        _slow_groups[timeout_s] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return _slow_groups[timeout_s]


def on_main(info: DistInfo, fn: Callable[..., T] | None, *args: Any, wait_s: float | None = None,
            **kwargs: Any) -> T | None:
    """Run `fn` on rank 0 only (file writes, plots); every rank waits for it and returns its result.

    If `fn` fails on rank 0, rank 0 re-raises and the other ranks raise DistributedError naming the failure,
    instead of waiting in a barrier until the timeout. The others wait up to the collective timeout, or up to
    `wait_s` seconds for a long job on rank 0 (e.g. building the default base model).
    """
    if not info.enabled:
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if info.is_main:
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:  # report to the others, then re-raise here
            error, outcome = exc, (False, f"{type(exc).__name__}: {exc}")
    box = [outcome if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_group_with_timeout(wait_s) if wait_s else None)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise DistributedError(f"rank {info.rank}: rank 0 failed in {getattr(fn, '__name__', 'a write')}: {value}")
    return value


# ------------------------------------------------------------------------------------------ batch sharding
def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's disjoint share of `items`, the same count on every rank (the tail that does not divide is dropped).

    Interleaved: rank r takes items r, r+W, r+2W, ... so after every rank has done k items, exactly the global
    prefix items[:k·W] is consumed — a position any world size can resume from
    (`shard(items[k·W:], ...)`: what train.loop does).
    """
    per_rank = len(items) // world_size if world_size > 1 else len(items)
    return [items[i] for i in range(rank, per_rank * world_size, world_size)] if world_size > 1 else list(items)


def shard_for_eval(items: Sequence[T], rank: int, world_size: int) -> list[tuple[T, bool]]:
    """Every item exactly once over all ranks, as (item, counted) pairs of the same count on every rank.

    Ranks short of an item re-run a real one with counted=False (FSDP needs every rank to run the same number
    of forwards; the result of such a re-run must not be added to the metric).
    """
    if world_size <= 1 or not items:
        return [(item, True) for item in items]
    per_rank = -(-len(items) // world_size)
    return [(items[i], True) if i < len(items) else (items[i % len(items)], False)
            for i in range(rank, per_rank * world_size, world_size)]


# ------------------------------------------------------------------------------------------- DDP / FSDP
def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel over `module`'s trainable parameters; `module` itself when not distributed.

    Frozen parameters (requires_grad False: the LoRA base) get no gradient bucket; they are also left out of
    DDP's start-up broadcast, because every rank loads the same base from disk (the trainable ones are
    broadcast from rank 0, so all ranks start equal). `find_unused_parameters` is only needed when some
    trainable parameter gets no gradient in a step (it costs a graph walk per step); LoRA and the S-BERT
    encoder use all of theirs. Call the wrapper (its forward) for every training step.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def apply_fsdp(model: nn.Module, info: DistInfo, layer_modules: Sequence[nn.Module],
               reshard_after_forward: bool = True, sync_trainable: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each transformer layer, then the root; returns `model` (sharded in place).

    Every parameter — frozen base weights included — becomes a DTensor holding ≈ 1/N of it on each rank
    (dim-0 chunks); a layer's full weights exist only while that layer runs (all-gathered in its forward,
    freed after it, again in backward). Frozen and trainable parameters may share a layer: only trainable
    ones get gradients, reduce-scattered and averaged over ranks. The base must be identical on all ranks
    (loaded from the same files); `sync_trainable` broadcasts the trainable tensors from rank 0 first, as DDP
    does. Not distributed: `model` unchanged.
    """
    if not info.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if sync_trainable:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in layer_modules:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def grad_sync(module: nn.Module, sync: bool):
    """Context for one micro-batch's forward+backward: `sync=False` on all but the last micro-batch of an
    accumulation window skips DDP's all-reduce / FSDP's reduce-scatter (gradients accumulate locally)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return nullcontext() if sync else module.no_sync()
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
    return nullcontext()


def mean_grad_factor(global_count: float, world_size: int) -> float:
    """The factor that turns each rank's gradient of a *summed* loss into the global per-item mean.

    DDP and FSDP average gradients over the N ranks, so with each rank's gradient g_r of a summed loss,
        averaged = (1/N) Σ_r g_r · factor   must equal   Σ_r g_r / C,   C = global_count (all ranks' items)
    hence factor = N / C. One process with the same global batch computes Σ g / C: the same number. (Dividing
    each rank by its own count instead would weigh a rank with few tokens as much as one with many.)
    """
    return world_size / max(global_count, 1.0)


# ---------------------------------------------------------------------------- sharded ⇄ full tensors
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain full tensor (gathered from all ranks when `t` is an FSDP-sharded DTensor: a collective)."""
    return t.full_tensor() if _is_dtensor(t) else t


def load_full_tensor(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `param` in place — into this rank's shard when `param` is a DTensor."""
    with torch.no_grad():
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()  # every rank holds `full`: no traffic
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of the trainable parameters; all ranks must call it (FSDP gathers). DDP's
    `module.` prefix is dropped, so names equal a single-process run's."""
    return {n: full_tensor(p.detach()).cpu().contiguous()
            for n, p in unwrap(module).named_parameters() if p.requires_grad}


@contextmanager
def full_trainable_params(module: nn.Module) -> Iterator[None]:
    """Inside, every trainable FSDP-sharded parameter of `module` is temporarily its full tensor, so code
    written for a plain model (e.g. `lora.save_adapter`) works unchanged on rank 0. All ranks must enter it
    (the gather is a collective). No-op for plain and DDP modules. Parameters are put back on exit."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.requires_grad and _is_dtensor(p):
                    mod._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                    swapped.append((mod, name, p))
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded (DTensor) state gathered to a plain CPU tensor: the same
    layout a single-process run saves, so it loads under any world size. All ranks must call it."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: (full_tensor(v).cpu() if torch.is_tensor(v) else v) for n, v in s.items()}
                   for k, s in sd["state"].items()}
    return sd


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full (single-process layout) optimizer state, resharding it where the parameters are DTensors."""
    optimizer.load_state_dict(sd)
    from torch.distributed.tensor import distribute_tensor

    for p, state in optimizer.state.items():
        if not _is_dtensor(p):
            continue
        for k, v in list(state.items()):
            if torch.is_tensor(v) and not _is_dtensor(v) and v.shape == p.shape and v.dim() > 0:
                state[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                             src_data_rank=None)
