"""A toy "frozen base + LoRA-like adapter" model and a training routine for the train/distributed.py tests.

Run by torchrun (`python -m torch.distributed.run --nproc-per-node 2 tests/dist_toy.py MODE OUT`) and imported
by the tests for the single-process reference. MODE: ddp | fsdp | ddp,fsdp | die.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.distributed import (  # noqa: E402
    DistInfo,
    all_reduce_sum,
    apply_fsdp,
    distributed_session,
    full_optimizer_state_dict,
    full_trainable_params,
    gather_objects,
    grad_sync,
    load_full_tensor,
    load_optimizer_state_dict,
    mean_grad_factor,
    on_main,
    shard,
    trainable_state_dict,
    wrap_ddp,
)

DIM, N_LAYERS, N_BATCHES, BATCH, STEPS, ACCUM = 16, 3, 12, 3, 3, 2
SLOW_S = 7.0  # > the 5 s collective timeout the test sets


class ToyLayer(nn.Module):
    """y = relu(W x + s·B A x) + x with W frozen (the "base") and A, B trainable."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(4, DIM) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(DIM, 4) * 0.3)

    def forward(self, x):
        return torch.relu(self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()) + x


class ToyLoss(nn.Module):
    """forward(x, y, mask) -> (summed squared error over the unmasked rows, their count), like the SFT loss."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(ToyLayer() for _ in range(N_LAYERS))
        self.head = nn.Linear(DIM, 1)  # trainable, with a bias: a 1-row tensor FSDP shards unevenly

    def forward(self, x, y, mask):
        for layer in self.layers:
            x = layer(x)
        err = (self.head(x).squeeze(-1) - y) ** 2
        return (err * mask).sum(), int(mask.sum())


def make_model() -> ToyLoss:
    torch.manual_seed(0)
    return ToyLoss()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_BATCHES):
        mask = (torch.rand(BATCH, generator=g) > 0.3).float()  # uneven counts per batch
        mask[0] = 1.0
        out.append((torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, generator=g), mask))
    return out


def train(info: DistInfo, mode: str, accum: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """STEPS optimizer steps; each step covers `accum × world` consecutive batches of the global list."""
    model = make_model()
    module: nn.Module = model
    if mode == "fsdp":
        module = apply_fsdp(model, info, list(model.layers))
    elif mode == "ddp":
        module = wrap_ddp(model, info)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    mine = shard(make_batches(), info.rank, info.world_size)
    for step in range(STEPS):
        window = mine[step * accum:(step + 1) * accum]
        n_local = 0
        for k, (x, y, m) in enumerate(window):
            with grad_sync(module, sync=k == len(window) - 1):
                loss, n = module(x, y, m)
                loss.backward()
            n_local += n
        (n_global,) = all_reduce_sum([n_local]) if info.enabled else [n_local]
        factor = mean_grad_factor(n_global, info.world_size)
        for p in params:
            p.grad.mul_(factor)
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    with distributed_session() as info:
        if mode == "die":  # both ranks all-reduce in a loop until the test kills or stops rank 1
            all_reduce_sum([1.0])
            print(f"rank {info.rank} ready", flush=True)
            for _ in range(100000):
                all_reduce_sum([1.0])
                time.sleep(0.01)
            return
        # rank 0 busy for longer than the collective timeout ($OHLORA_DIST_TIMEOUT, set short by the test): the
        # others wait for it because on_main was given wait_s
        slept = on_main(info, lambda: time.sleep(SLOW_S) or SLOW_S, wait_s=120)
        modes = mode.split(",")  # e.g. "ddp,fsdp": both in one process group
        for mode in modes:
            model, opt = train(info, mode, accum=1)
            state = trainable_state_dict(model)                  # collective under FSDP
            optim_sd = full_optimizer_state_dict(opt)            # collective under FSDP
            with full_trainable_params(model):                   # plain tensors for a plain writer
                seen = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}

            def write() -> None:
                from safetensors.torch import save_file
                save_file(state, str(out / f"{mode}.safetensors"))
                torch.save(optim_sd, out / f"{mode}_optim.pt")
                (out / f"{mode}_shapes.txt").write_text(repr({n: list(s) for n, s in seen.items()}))
            on_main(info, write)
            # round trips: zero the (sharded) trainable weights, load the gathered full state back; a fresh
            # optimizer loads the gathered optimizer state and gathers it again
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            for n, p in params:
                load_full_tensor(p, torch.zeros_like(state[n]))
            zeroed = max(float(v.abs().max()) for v in trainable_state_dict(model).values())
            for n, p in params:
                load_full_tensor(p, state[n])
            back = trainable_state_dict(model)
            param_diff = max(float((back[n] - state[n]).abs().max()) for n in state)
            fresh = torch.optim.AdamW([p for _, p in params], lr=0.05, weight_decay=0.01)
            load_optimizer_state_dict(fresh, optim_sd)
            again = full_optimizer_state_dict(fresh)
            diff = max(float((again["state"][k][s] - optim_sd["state"][k][s]).abs().max())
                       for k in optim_sd["state"] for s in ("exp_avg", "exp_avg_sq", "step"))
            local_numel = {n: p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                           for n, p in model.named_parameters()}
            numels = gather_objects(local_numel)

            def failing_write() -> None:
                raise OSError("disk full")
            try:  # rank 0 re-raises its error, the other ranks get DistributedError (not a hang)
                on_main(info, failing_write)
                caught = "nothing"
            except Exception as exc:
                caught = f"{type(exc).__name__}: {exc}"
            errors = gather_objects(caught)
            on_main(info, lambda: (out / f"{mode}_check.txt").write_text(
                repr({"optim_roundtrip": diff, "param_roundtrip": param_diff, "zeroed": zeroed,
                      "numel_per_rank": numels, "on_main_errors": errors, "slept": slept})))


if __name__ == "__main__":
    main()
