"""A small, generic training loop: AdamW + warmup/decay, accumulation, clipping, autocast, eval, resume.

The loop knows nothing about language models. It drives a `train_module` whose `forward(**batch)` returns
`(loss_sum, n_tokens)` — the *summed* loss over the tokens it scored — and normalises the gradients by the
number of tokens in the whole accumulation window, so a window of uneven batches weighs every token alike
(what one big batch would do). Keeping the loss inside an `nn.Module` forward is also what DDP/FSDP need.

Resume: `OUT/state/` holds the trainable tensors (safetensors) and `state.pt` (optimizer, scheduler, grad
scaler, RNG states, epoch / micro-batch position, best eval loss), loaded with `torch.load(weights_only=True)`.
Batches of an epoch are a pure function of (seed, epoch), so skipping the micro-batches already done and
restoring the RNG gives the same weights as an uninterrupted run. Evaluation and sample generation run inside
`torch.random.fork_rng`, so how often one evaluates never changes the training RNG stream.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from core.atomic import atomic_write_dir, atomic_write_text
from train.distributed import (DistInfo, all_reduce_sum, full_optimizer_state_dict, full_trainable_params,
                               gather_objects, grad_sync, init_distributed, is_fsdp, load_full_tensor,
                               load_optimizer_state_dict, on_main, shard, trainable_state_dict, unwrap, wrap_ddp)
from train.optim import build_adamw, build_scheduler
from train.progress import JsonlLogger, plot_curves, progress_bar, read_jsonl

STATE_VERSION = 2  # 2: the position is kept in global micro-batches (any world size resumes it)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the optimizer step and micro-batch."""


class ResumeError(ValueError):
    """A --resume folder is missing or does not match the model being trained."""


@dataclass
class LoopConfig:
    epochs: int = 1
    max_steps: int | None = None        # optimizer steps; when set it overrides `epochs`
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_schedule: str = "cosine"         # cosine | linear | constant (after linear warmup)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0   # None/0: no clipping
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast; fp16 only on CUDA)
    seed: int = 42
    output_dir: str | None = None       # None: nothing written
    resume: str | None = None           # a state folder written by a previous run (OUT/state)
    save_state_steps: int | None = None  # also save resume state every N optimizer steps
    stop_after_steps: int | None = None  # stop early as if interrupted (state saved): tests / demos
    eval_every_epoch: bool = True
    eval_at_start: bool = True          # eval loss before the first step (the baseline the run improves on)
    log_every: int = 1
    progress: bool = True
    desc: str = "train"


@dataclass
class TrainResult:
    global_step: int = 0
    epoch: int = 0
    best_eval_loss: float | None = None
    last_eval: dict = field(default_factory=dict)
    start_eval: dict = field(default_factory=dict)  # before the first step (eval_at_start)
    train_tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast on CUDA, bf16 on CPU when asked; fp32 is a no-op."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 autocast needs CUDA; on CPU use bf16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def rank_batches(batches: Sequence[Any], info: DistInfo) -> list[Any]:
    """This rank's share of an epoch's batches — the one place that decides it (a disjoint equal share)."""
    return shard(batches, info.rank, info.world_size)


def trainable_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):  # python's random state must be nested tuples again after (de)serialisation
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One training run. Call `fit()`.

    - `train_module(**batch) -> (loss_sum, n_tokens)`; its parameters with requires_grad are trained.
    - `batches_for_epoch(epoch) -> list[spec]`: all micro-batches of the epoch, deterministic in epoch; a spec
      is cheap (e.g. example indices) and `collate_fn(spec) -> batch dict` builds the tensors when needed, so
      sharding over ranks (`rank_batches`) only moves indices.
    - `eval_fn() -> dict` with at least `eval_loss` (optional); called at each epoch end under no_grad.
    - `save_fn(folder)`: writes the adapter into a fresh folder (called for best/ and last/, atomically).
    - `sample_fn() -> dict` (optional): e.g. sample generations after each eval; logged as they come.
    """

    def __init__(self, train_module: torch.nn.Module, config: LoopConfig,
                 batches_for_epoch: Callable[[int], Sequence[Any]],
                 eval_fn: Callable[[], dict] | None = None, save_fn: Callable[[Path], None] | None = None,
                 sample_fn: Callable[[], dict] | None = None, training_args: dict | None = None,
                 info: DistInfo | None = None, tokens_in_batch: Callable[[Any], int] | None = None,
                 collate_fn: Callable[[Any], Any] | None = None):
        self.cfg = config
        self.batches_for_epoch, self.eval_fn, self.save_fn, self.sample_fn = \
            batches_for_epoch, eval_fn, save_fn, sample_fn
        self.training_args = training_args or {}
        self.info = info or init_distributed()
        # Under torchrun: DDP over the trainable parameters, unless the caller sharded the module with FSDP2
        # (train.distributed.apply_fsdp). `self.module` is what a step calls; parameter names come from the
        # unwrapped module, so states and adapters look the same for every world size.
        self.module = train_module if is_fsdp(train_module) else wrap_ddp(train_module, self.info)
        self.tokens_in_batch = tokens_in_batch or _count_input_tokens
        self.collate_fn = collate_fn or (lambda spec: spec)
        self.out = Path(config.output_dir) if config.output_dir else None
        self.is_main = self.info.is_main
        self.named_params = trainable_named_parameters(train_module)
        self.params = [p for _, p in self.named_params]
        if config.grad_accum < 1:
            raise ValueError(f"grad_accum must be ≥ 1, got {config.grad_accum}")
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.logger = JsonlLogger(self.out / "log.jsonl" if (self.out and self.is_main) else None)

    # ----------------------------------------------------------------------------------------------- plan
    def _steps_per_epoch(self) -> int:
        n_micro = len(rank_batches(self.batches_for_epoch(0), self.info))
        if n_micro == 0:
            raise ValueError("no training batches (empty training set?)")
        return math.ceil(n_micro / self.cfg.grad_accum)

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> TrainResult:
        cfg = self.cfg
        seed_everything(cfg.seed)
        steps_per_epoch = self._steps_per_epoch()
        if cfg.max_steps:
            total_steps = cfg.max_steps
            epochs = math.ceil(total_steps / steps_per_epoch)
        else:
            epochs = cfg.epochs
            total_steps = epochs * steps_per_epoch
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self.optimizer = build_adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup, cfg.lr_schedule)
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.precision == "fp16"
                                                       and self.device.type == "cuda") else None
        res = TrainResult()
        start_epoch, start_global = 0, 0
        if cfg.resume:
            start_epoch, start_global, res = self._load_state(Path(cfg.resume))
        elif self.is_main and self.out:
            (self.out / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
            self.logger.log(event="start", total_steps=total_steps, epochs=epochs, warmup_steps=warmup,
                            steps_per_epoch=steps_per_epoch, world_size=self.info.world_size,
                            micro_batches_per_step=self.info.world_size * cfg.grad_accum,
                            trainable_params=sum(p.numel() for p in self.params))
        if cfg.eval_at_start and self.eval_fn and not cfg.resume:
            self._evaluate_and_save(res, 0.0, save=False, samples=False)
            res.start_eval = dict(res.last_eval)
        bar = progress_bar(total_steps, cfg.desc, enabled=cfg.progress and self.is_main)
        bar.update(res.global_step)
        t_start, tok_window, t_window = time.perf_counter(), 0, time.perf_counter()
        self.module.train()
        try:
            world = self.info.world_size
            for epoch in range(start_epoch, epochs):
                # Resume at a *global* position: every rank takes its share of the batches not yet done, so
                # a run saved by N ranks continues under M ranks on the same data.
                epoch_batches = self.batches_for_epoch(epoch)
                offset = start_global if epoch == start_epoch else 0
                batches = rank_batches(list(epoch_batches)[offset:], self.info)
                micro = 0
                while micro < len(batches) and res.global_step < total_steps:
                    window = batches[micro:micro + cfg.grad_accum]
                    loss, n_tok, n_in = self._optimizer_step(window, res.global_step, epoch, micro)
                    micro += len(window)
                    res.global_step += 1
                    res.train_tokens += n_in
                    tok_window += n_in
                    bar.update(1)
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                    if res.global_step % cfg.log_every == 0 or res.global_step == total_steps:
                        self.logger.log(step=res.global_step,
                                        epoch=epoch + (offset + micro * world) / len(epoch_batches),
                                        train_loss=loss, lr=self.scheduler.get_last_lr()[0],
                                        tokens_per_s=round(tps, 1), loss_tokens=n_tok)
                        tok_window, t_window = 0, now
                    stop_now = cfg.stop_after_steps is not None and res.global_step >= cfg.stop_after_steps
                    if (cfg.save_state_steps and res.global_step % cfg.save_state_steps == 0) or stop_now:
                        self._save_state(epoch, offset + micro * world, res)
                    if stop_now:
                        res.stopped_early = True
                        res.epoch = epoch
                        return self._finish(res, bar, t_start)
                epoch_done = micro >= len(batches)
                position = offset + micro * world
                res.epoch = epoch + 1 if epoch_done else epoch
                if cfg.eval_every_epoch or res.global_step >= total_steps:
                    self._evaluate_and_save(res, epoch + 1 if epoch_done else epoch + position / len(epoch_batches))
                self._save_state(epoch + 1 if epoch_done else epoch, 0 if epoch_done else position, res)
                if res.global_step >= total_steps:
                    break
        finally:
            bar.close()
        return self._finish(res, bar, t_start)

    def _finish(self, res: TrainResult, bar, t_start: float) -> TrainResult:
        res.seconds = time.perf_counter() - t_start
        if self.is_main and self.out and (self.out / "log.jsonl").exists():
            plot_curves(read_jsonl(self.out / "log.jsonl"), self.out / "loss.png", x="step",
                        ys=("train_loss", "eval_loss"), title="SFT loss")
        return res

    # ------------------------------------------------------------------------------------------- one step
    def _optimizer_step(self, window: Sequence[Any], step: int, epoch: int, micro: int) -> tuple[float, int, int]:
        """Forward/backward over the window's micro-batches, grads / tokens, clip, step. Returns
        (mean loss per token, loss tokens, input tokens)."""
        loss_total, n_total, n_input = 0.0, 0, 0
        for k, spec in enumerate(window):
            batch = _to_device(self.collate_fn(spec), self.device)
            with grad_sync(self.module, sync=k == len(window) - 1):  # DDP/FSDP: reduce grads once per step
                with autocast_context(self.cfg.precision, self.device):
                    loss_sum, n_tok = self.module(**batch)
                loss_value = float(loss_sum.detach())
                if not math.isfinite(loss_value):
                    where = f" on rank {self.info.rank}" if self.info.enabled else ""
                    raise NonFiniteLossError(
                        f"training loss is {loss_value} at optimizer step {step + 1} (epoch {epoch + 1}, "
                        f"micro-batch {micro + k + 1}){where}; try a lower --lr, fp32, or check the data")
                (self.scaler.scale(loss_sum) if self.scaler else loss_sum).backward()
            loss_total += loss_value
            n_total += int(n_tok)
            n_input += self.tokens_in_batch(batch)
        if self.info.enabled:  # the window's totals over all ranks: the global batch
            loss_total, n_total, n_input = all_reduce_sum([loss_total, n_total, n_input])
            n_total, n_input = int(n_total), int(n_input)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self._normalise_grads(n_total)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total / max(n_total, 1), n_total, n_input

    def _normalise_grads(self, n_tokens: int) -> None:
        """Summed-loss grads → per-token mean over the window; `n_tokens` counts the whole global window.

        DDP and FSDP average the ranks' gradients (÷ world size), hence the factor world / n_tokens: the
        result is Σ_ranks grad(loss_sum) / n_tokens, what one process computes over the same global batch.
        """
        scale = self.info.world_size / max(n_tokens, 1)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)

    # --------------------------------------------------------------------------------------------- eval
    def _evaluate_and_save(self, res: TrainResult, epoch_pos: float, save: bool = True,
                           samples: bool = True) -> None:
        metrics: dict = {}
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=devices):  # eval / sampling never shift the training RNG stream
            self.module.eval()
            with torch.no_grad(), autocast_context(self.cfg.precision, self.device):
                if self.eval_fn:
                    metrics = dict(self.eval_fn())
                samples = self.sample_fn() if (samples and self.sample_fn and self.is_main) else None
            self.module.train()
        res.last_eval = metrics
        if samples:
            metrics = {**metrics, **samples}
        self.logger.log(step=res.global_step, epoch=round(epoch_pos, 4), **metrics)
        eval_loss = res.last_eval.get("eval_loss")
        if save and self.save_fn and self.out:
            if eval_loss is not None and (res.best_eval_loss is None or eval_loss < res.best_eval_loss):
                res.best_eval_loss = float(eval_loss)
                self._save_adapter("best", res, epoch_pos)
            self._save_adapter("last", res, epoch_pos)

    def _save_adapter(self, name: str, res: TrainResult, epoch_pos: float) -> None:
        args = {**self.training_args, "loop": asdict(self.cfg), "global_step": res.global_step,
                "epoch": round(epoch_pos, 4), "eval": res.last_eval, "world_size": self.info.world_size}

        def write(tmp: Path) -> None:
            self.save_fn(tmp)
            (tmp / "training_args.json").write_text(json.dumps(args, ensure_ascii=False, indent=2),
                                                    encoding="utf-8")
        # FSDP: every rank gathers the sharded adapter into full tensors, rank 0 writes them
        with full_trainable_params(unwrap(self.module)):
            on_main(self.info, atomic_write_dir, self.out / name, write)

    # ------------------------------------------------------------------------------------- resume state
    def _save_state(self, epoch: int, micro: int, res: TrainResult) -> None:
        """`micro`: global micro-batches of `epoch` done (all ranks together). Every rank takes part (FSDP
        gathers its shards; the RNG state of each rank is kept); rank 0 writes."""
        if not self.out:
            return
        tensors = trainable_state_dict(self.module)
        optimizer_state = full_optimizer_state_dict(self.optimizer)
        rng_per_rank = gather_objects(_rng_state())
        if self.is_main:
            state = {
                "version": STATE_VERSION, "epoch": epoch, "micro": micro, "global_micro": micro,
                "global_step": res.global_step, "train_tokens": res.train_tokens,
                "world_size": self.info.world_size,
                "micro_batches_per_step": self.info.world_size * self.cfg.grad_accum,
                "best_eval_loss": res.best_eval_loss, "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(), "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
                "scaler": self.scaler.state_dict() if self.scaler else None,
            }

            def write(tmp: Path) -> None:
                save_file(tensors, str(tmp / "trainable.safetensors"))
                torch.save(state, tmp / "state.pt")
                (tmp / "meta.json").write_text(json.dumps(
                    {"epoch": epoch, "micro_batch": micro, "global_step": res.global_step,
                     "best_eval_loss": res.best_eval_loss, "world_size": self.info.world_size,
                     "config": asdict(self.cfg)}, indent=2),
                    encoding="utf-8")

            def save() -> None:
                atomic_write_dir(self.out / "state", write)
        on_main(self.info, save if self.is_main else None)

    def _load_state(self, folder: Path) -> tuple[int, int, TrainResult]:
        if not (folder / "state.pt").is_file() or not (folder / "trainable.safetensors").is_file():
            raise ResumeError(f"{folder}: not a resume state folder (expected state.pt and "
                              "trainable.safetensors, as written to OUT/state)")
        tensors = load_file(str(folder / "trainable.safetensors"))
        names = [n for n, _ in self.named_params]
        if sorted(tensors) != sorted(names):
            missing = sorted(set(names) - set(tensors))[:3]
            raise ResumeError(f"{folder}: the saved trainable tensors do not match this model "
                              f"(e.g. missing {missing}); same --lora-r/--lora-targets/--model?")
        for n, p in self.named_params:
            if tensors[n].shape != p.shape:
                raise ResumeError(f"{folder}: {n} has shape {tuple(tensors[n].shape)}, "
                                  f"the model {tuple(p.shape)}")
            load_full_tensor(p, tensors[n])  # into this rank's shard under FSDP
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        load_optimizer_state_dict(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        world = self.info.world_size
        per_rank = state.get("rng_per_rank")
        _set_rng_state(per_rank[self.info.rank] if per_rank and len(per_rank) == world else state["rng"])
        global_micro = state.get("global_micro", state["micro"] * state.get("world_size", 1))
        res = TrainResult(global_step=state["global_step"], epoch=state["epoch"],
                          best_eval_loss=state["best_eval_loss"], train_tokens=state["train_tokens"])
        old_per_step = state.get("micro_batches_per_step", world * self.cfg.grad_accum)
        new_per_step = world * self.cfg.grad_accum
        if old_per_step != new_per_step:
            # Same data position, a different global batch: rescale the step count so the lr schedule
            # continues at the same fraction of the run. (Keep world × grad_accum fixed for identical updates.)
            res.global_step = round(res.global_step * old_per_step / new_per_step)
            self.scheduler.last_epoch = res.global_step - 1
            self.scheduler.step()
            if self.is_main:
                print(f"note: resuming with {new_per_step} micro-batches per optimizer step "
                      f"(world {world} × accumulation {self.cfg.grad_accum}) instead of {old_per_step}: the data "
                      f"position is kept, the step count becomes {res.global_step}", file=sys.stderr)
        self.logger.log(event="resume", step=res.global_step, epoch=state["epoch"], micro_batch=global_micro,
                        world_size=world, saved_world_size=state.get("world_size", 1))
        return state["epoch"], global_micro, res


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return batch


def _count_input_tokens(batch: Any) -> int:
    """Non-pad input tokens in a dict batch (attention_mask sum), else 0."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return 0


def write_json(path: str | os.PathLike, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2))
