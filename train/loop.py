"""A small, generic training loop: AdamW + warmup/decay, accumulation, clipping, autocast, eval, resume.

The loop knows nothing about language models. It drives a `train_module` whose `forward(**batch)` returns
`(loss_sum, n_tokens)` — the *summed* loss over the tokens it scored — and normalises the gradients by the
number of tokens in the whole accumulation window, so a window of uneven batches weighs every token alike
(what one big batch would do). Keeping the loss inside an `nn.Module` forward is also what DDP/FSDP need.

Resume: `OUT/state/` (train/checkpoint.py) holds the trainable tensors and `state.pt` (optimizer, scheduler,
grad scaler, RNG states, epoch / micro-batch position, best eval loss). Batches of an epoch are a pure function
of (seed, epoch), so skipping the micro-batches already done and restoring the RNG gives the same weights as an
uninterrupted run. Evaluation and sample generation run inside `torch.random.fork_rng`, so how often one
evaluates never changes the training RNG stream.

Never a silent NaN: a non-finite training loss, gradient norm, trainable parameter (after the step) or eval loss
stops the run with `NonFiniteError` naming the optimizer step, before anything is saved for it.
Crash safety: every folder is swapped in atomically (core/atomic.py); a run first recovers an interrupted swap
of OUT/state, best, last and removes the temporary folders killed writers left; a resume cuts log.jsonl back to
what it held when the state was saved, so redone steps are logged once.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.atomic import atomic_write_dir, clean_stale_temps, recover_dir
from core.cli import COUNT, NONNEG, POSITIVE, RATIO, flag
from core.errors import OhLoRAError
from core.malloc import return_large_blocks_to_os
from core.onednn import invalidate_packs
from core.unwrap import unwrap
from train.checkpoint import STATE_VERSION, ResumeError, read_resume_state, rng_state, set_rng_state, write_state
from train.distributed import (
    DistInfo,
    all_reduce_sum,
    full_optimizer_state_dict,
    full_trainable_params,
    gather_objects,
    grad_sync,
    init_distributed,
    is_fsdp,
    load_full_tensor,
    load_optimizer_state_dict,
    mean_grad_factor,
    on_main,
    shard,
    shard_for_eval,
    trainable_state_dict,
    wrap_ddp,
)
from train.optim import build_adamw, build_scheduler
from train.progress import JsonlLogger, plot_curves, print_line, progress_bar, read_jsonl


class NonFiniteError(OhLoRAError, RuntimeError):
    """A loss, gradient norm, parameter or eval loss became NaN/inf; the message names the optimizer step."""

    exit_code = 1  # the run diverged: not a bad input


NonFiniteLossError = NonFiniteError  # the former name


@dataclass
class LoopConfig:
    """The loop's settings; the fields a command exposes become its flags (core.cli, e.g. train.sft's)."""
    epochs: int = flag(1, range=COUNT, help="passes over the training data")
    max_steps: int | None = flag(None, range=COUNT, help="optimizer steps; overrides --epochs")
    lr: float = flag(2e-4, range=POSITIVE, help="peak lr")
    weight_decay: float = flag(0.0, range=NONNEG, help="AdamW weight decay")
    no_decay: tuple[str, ...] = ()      # parameter-name parts without weight decay (e.g. "bias")
    warmup_ratio: float = flag(0.0, range=RATIO, help="share of the steps with linear warmup")
    lr_schedule: str = flag("cosine", choices=("cosine", "linear", "constant"), help="decay after the warmup")
    grad_accum: int = flag(1, range=COUNT, help="micro-batches per optimizer step")
    max_grad_norm: float | None = flag(1.0, range=NONNEG, help="gradient clipping (0 = none)")
    precision: str = "fp32"             # fp32 | bf16 | fp16 (autocast; fp16 only on CUDA)
    seed: int = flag(42, help="adapter init, batch order, dropout")
    output_dir: str | None = flag(None, kind="output_dir", help="where state/, best/, last/, log.jsonl and loss.png "
                                                                "go (None: nothing written)")
    resume: str | None = flag(None, kind="dir", help="continue from a state folder (OUT/state of an earlier run)")
    save_state_steps: int | None = flag(None, range=COUNT, help="also save resume state every N steps")
    # stop early as if interrupted (state saved): tests / demos
    stop_after_steps: int | None = flag(None, range=COUNT, help=argparse.SUPPRESS)
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
    best_epoch: float | None = None                 # epoch position of the evaluation saved as best
    last_eval: dict = field(default_factory=dict)
    start_eval: dict = field(default_factory=dict)  # before the first step (eval_at_start)
    test: dict = field(default_factory=dict)        # the caller's own evaluations after training (e.g. S-BERT's)
    train_tokens: int = 0                           # tokens_in_batch summed: input tokens (SFT), pairs (S-BERT)
    train_seconds: float = 0.0                      # inside optimizer steps only (no eval, no checkpoints)
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def train_items_per_s(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


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
    - `save_fn(folder)`: writes the adapter into a fresh folder (called for best/ and last/, atomically);
      without an eval loss (no validation data) best/ follows last/.
    - `sample_fn() -> dict` (optional): e.g. sample generations after each eval; logged as they come.
    - `on_optimizer(optimizer)` (optional): called once the optimizer exists, e.g. to register step hooks.
    """

    def __init__(self, train_module: torch.nn.Module, config: LoopConfig,
                 batches_for_epoch: Callable[[int], Sequence[Any]],
                 eval_fn: Callable[[], dict] | None = None, save_fn: Callable[[Path], None] | None = None,
                 sample_fn: Callable[[], dict] | None = None, training_args: dict | None = None,
                 info: DistInfo | None = None, tokens_in_batch: Callable[[Any], int] | None = None,
                 collate_fn: Callable[[Any], Any] | None = None,
                 on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None):
        self.cfg = config
        self.batches_for_epoch, self.eval_fn, self.save_fn, self.sample_fn = \
            batches_for_epoch, eval_fn, save_fn, sample_fn
        self.on_optimizer = on_optimizer
        self.training_args = training_args or {}
        self.info = info or init_distributed()
        # Under torchrun: DDP over the trainable parameters, unless the caller sharded the module with FSDP2
        # (train.distributed.apply_fsdp). `self.module` is what a step calls; parameter names come from the
        # unwrapped module, so states and adapters look the same for every world size.
        self.train_module = train_module
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

    def _recover_output(self) -> None:
        """Finish or undo what a killed run left: an interrupted folder swap, stale temporary folders."""
        def recover() -> None:
            if self.out:
                for name in ("state", "best", "last"):
                    recover_dir(self.out / name)
                for name in ("state", "best", "last", "loss.png"):
                    clean_stale_temps(self.out / name)
            if self.cfg.resume:
                recover_dir(self.cfg.resume)
        on_main(self.info, recover if self.is_main else None)  # the other ranks wait, then read the state

    # ------------------------------------------------------------------------------------------------ fit
    def _setup(self) -> tuple[int, int, int]:
        """Seed, plan, optimizer / schedule / scaler, recover OUT. Returns (total_steps, epochs, warmup)."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.steps_per_epoch = self._steps_per_epoch()
        epochs = math.ceil(cfg.max_steps / self.steps_per_epoch) if cfg.max_steps else cfg.epochs
        total_steps = cfg.max_steps or epochs * self.steps_per_epoch
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self.optimizer = build_adamw(self.named_params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     no_decay=cfg.no_decay)
        if self.on_optimizer:
            self.on_optimizer(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup, cfg.lr_schedule)
        self.scaler = torch.amp.GradScaler("cuda") if (cfg.precision == "fp16"
                                                       and self.device.type == "cuda") else None
        self._recover_output()
        return total_steps, epochs, warmup

    def fit(self) -> TrainResult:
        cfg, world = self.cfg, self.info.world_size
        if self.device.type == "cpu":
            return_large_blocks_to_os()  # freed activations go back to the OS: RSS does not creep (core/malloc.py)
        total_steps, epochs, warmup = self._setup()
        res, start_epoch, start_micro = TrainResult(), 0, 0
        if cfg.resume:
            start_epoch, start_micro, res = self._load_state(Path(cfg.resume))
        elif self.is_main and self.out:
            self.logger.truncate(0)  # a fresh run starts a fresh log
            self.logger.log(event="start", total_steps=total_steps, epochs=epochs, warmup_steps=warmup,
                            steps_per_epoch=self.steps_per_epoch, world_size=world,
                            micro_batches_per_step=world * cfg.grad_accum,
                            trainable_params=sum(p.numel() for p in self.params))
        if cfg.eval_at_start and self.eval_fn and not cfg.resume:
            self._evaluate_and_save(res, 0.0, save=False, samples=False)
            res.start_eval = dict(res.last_eval)
        self.bar = progress_bar(total_steps, cfg.desc, enabled=cfg.progress and self.is_main)
        self.bar.update(res.global_step)
        t_start = time.perf_counter()
        self._since_log = [0.0, 0, 0, t_start]  # loss sum, loss tokens, input tokens, time of the last log line
        self.module.train()
        try:
            for epoch in range(start_epoch, epochs):
                # Positions are *global* micro-batches of the epoch (all ranks together): every rank takes its
                # share of the batches not yet done, so a run saved by N ranks continues under M ranks.
                epoch_batches = list(self.batches_for_epoch(epoch))
                done = start_micro if epoch == start_epoch else 0
                mine = rank_batches(epoch_batches[done:], self.info)
                finished = True
                for i in range(0, len(mine), cfg.grad_accum):
                    if res.global_step >= total_steps:
                        finished = False
                        break
                    window = mine[i:i + cfg.grad_accum]
                    self._train_step(window, res, epoch, done, total_steps,
                                     epoch_pos=epoch + (done + len(window) * world) / len(epoch_batches))
                    done += len(window) * world
                    stop_now = cfg.stop_after_steps is not None and res.global_step >= cfg.stop_after_steps
                    if stop_now or (cfg.save_state_steps and res.global_step % cfg.save_state_steps == 0):
                        self._save_state(epoch, done, res)
                    if stop_now:
                        res.stopped_early, res.epoch = True, epoch
                        return self._finish(res, t_start)
                res.epoch = epoch + 1 if finished else epoch
                if cfg.eval_every_epoch or res.global_step >= total_steps:
                    self._evaluate_and_save(res, res.epoch if finished else epoch + done / len(epoch_batches))
                self._save_state(*((epoch + 1, 0) if finished else (epoch, done)), res)
                if res.global_step >= total_steps:
                    break
        finally:
            self.bar.close()
        return self._finish(res, t_start)

    def _train_step(self, window: Sequence[Any], res: TrainResult, epoch: int, done: int, total_steps: int,
                    epoch_pos: float) -> None:
        """One optimizer step over `window`, counted into `res`; a log line every `log_every` steps with the
        mean loss per token since the previous line."""
        t0 = time.perf_counter()
        loss_sum, n_tok, n_in, grad_norm = self._optimizer_step(window, res.global_step + 1, epoch, done)
        now = time.perf_counter()
        res.global_step += 1
        res.train_tokens += n_in
        res.train_seconds += now - t0
        s = self._since_log
        s[0], s[1], s[2] = s[0] + loss_sum, s[1] + n_tok, s[2] + n_in
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_sum / max(n_tok, 1):.4f}")
        if res.global_step % self.cfg.log_every == 0 or res.global_step == total_steps:
            self.logger.log(step=res.global_step, epoch=epoch_pos, train_loss=s[0] / max(s[1], 1),
                            lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                            tokens_per_s=round(s[2] / max(now - s[3], 1e-9), 1), loss_tokens=s[1])
            self._since_log = [0.0, 0, 0, now]

    def _finish(self, res: TrainResult, t_start: float) -> TrainResult:
        res.seconds = time.perf_counter() - t_start
        if self.is_main and self.out and (self.out / "log.jsonl").exists():
            plot_curves(read_jsonl(self.out / "log.jsonl"), self.out / "loss.png", x="step",
                        ys=("train_loss", "eval_loss"), title=f"{self.cfg.desc} loss")
        return res

    # ------------------------------------------------------------------------------------------- one step
    def _optimizer_step(self, window: Sequence[Any], step: int, epoch: int,
                        done: int) -> tuple[float, int, int, float]:
        """Forward/backward over the window's micro-batches, grads / tokens, clip, step, check. Returns the
        window's (loss sum, loss tokens, input tokens) over all ranks and the gradient norm. `step`: 1-based."""
        loss_total, n_total, n_input, first_bad = 0.0, 0, 0, None
        for k, spec in enumerate(window):
            batch = _to_device(self.collate_fn(spec), self.device)
            with grad_sync(self.module, sync=k == len(window) - 1):  # DDP/FSDP: reduce grads once per step
                with autocast_context(self.cfg.precision, self.device):
                    loss_sum, n_tok = self.module(**batch)
                loss_value = float(loss_sum.detach())
                if first_bad is None and not math.isfinite(loss_value):
                    first_bad = (k, loss_value)
                # backward even then: every rank must join the gradient all-reduce; the step raises below
                (self.scaler.scale(loss_sum) if self.scaler else loss_sum).backward()
            loss_total += loss_value
            n_total += int(n_tok)
            n_input += self.tokens_in_batch(batch)
        if self.info.enabled:  # the window's totals over all ranks: the global batch
            loss_total, n_total, n_input = all_reduce_sum([loss_total, n_total, n_input])
            n_total, n_input = int(n_total), int(n_input)
        if not math.isfinite(loss_total):  # every rank sees the global sum: all stop together
            where = (f"epoch {epoch + 1}, micro-batch {done + first_bad[0] + 1}" if first_bad
                     else f"epoch {epoch + 1}, on another rank")
            if first_bad and self.info.enabled:
                where += f" on rank {self.info.rank}"
            value = first_bad[1] if first_bad else loss_total
            raise NonFiniteError(f"training loss is {value} at optimizer step {step} ({where}); try a lower "
                                 "--lr, fp32, or check the data")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self._normalise_grads(n_total)
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm) and not self.scaler:  # fp16: the scaler skips such a step by design
            raise NonFiniteError(f"gradient norm is {grad_norm} at optimizer step {step} (epoch {epoch + 1}); "
                                 "try a lower --lr or --max-grad-norm")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._check_parameters(step)
        return loss_total, n_total, n_input, grad_norm

    def _normalise_grads(self, n_tokens: int) -> None:
        """Summed-loss grads → per-token mean over the window; `n_tokens` counts the whole global window, so the
        result is what one process computes over the same global batch (see `mean_grad_factor`)."""
        scale = mean_grad_factor(n_tokens, self.info.world_size)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)

    def _grad_norm(self) -> float:
        """The global L2 norm of the gradients (always: it is checked and logged), clipped when asked."""
        if self.cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm

    def _check_parameters(self, step: int) -> None:
        """Every trainable tensor finite after the update (one sync; cheap for LoRA, one pass for a full model)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]  # FSDP: this rank's shard
        finite = torch.stack([torch.isfinite(t).all() for t in local]).tolist()
        n_bad = finite.count(False)
        if is_fsdp(self.module):  # shards differ per rank: all stop together
            n_bad = int(all_reduce_sum([n_bad])[0])
        if n_bad:
            names = [n for (n, _), ok in zip(self.named_params, finite) if not ok] or ["on another rank"]
            raise NonFiniteError(f"parameters became NaN/inf at optimizer step {step} ({', '.join(names[:3])}"
                                 f"{', …' if len(names) > 3 else ''}); try a lower --lr or --max-grad-norm")

    # --------------------------------------------------------------------------------------------- eval
    def evaluate(self, batches: Sequence[Any], collate_fn: Callable[[Any], Any] | None = None) -> dict:
        """The loss per item over `batches` (specs for `collate_fn`, default the training one), every rank
        scoring its share: {"eval_loss", "eval_tokens"}, or {} without batches. For `eval_fn`."""
        return evaluate_loss(self.train_module, batches, collate_fn or self.collate_fn, self.info, self.device)

    def _evaluate_and_save(self, res: TrainResult, epoch_pos: float, save: bool = True,
                           samples: bool = True) -> None:
        metrics: dict = {}
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=devices):  # eval / sampling never shift the training RNG stream
            self.module.eval()
            with torch.no_grad(), autocast_context(self.cfg.precision, self.device):
                if self.eval_fn:
                    metrics = dict(self.eval_fn())
                eval_loss = metrics.get("eval_loss")
                if eval_loss is not None and not math.isfinite(eval_loss):  # before it can become "best"
                    when = (f"after optimizer step {res.global_step}" if res.global_step
                            else "at optimizer step 0 (before training: is the base model broken?)")
                    raise NonFiniteError(f"eval loss is {eval_loss} {when}; nothing was saved for it")
                samples = self.sample_fn() if (samples and self.sample_fn and self.is_main) else None
            self.module.train()
        res.last_eval = metrics
        if samples:
            metrics = {**metrics, **samples}
        self.logger.log(step=res.global_step, epoch=round(epoch_pos, 4), **metrics)
        if not (save and self.save_fn and self.out):
            return
        best = eval_loss is None or res.best_eval_loss is None or eval_loss < res.best_eval_loss
        if best:  # without an eval loss (no validation data) best/ is the latest
            res.best_eval_loss = None if eval_loss is None else float(eval_loss)
            res.best_epoch = round(epoch_pos, 4)
            self._save_adapter("best", res, epoch_pos)
        self._save_adapter("last", res, epoch_pos)
        if self.is_main and eval_loss is not None:
            print_line(f"epoch {epoch_pos:.4g}: eval loss {eval_loss:.4f}" + (" (best)" if best else ""))

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
        rng_per_rank = gather_objects(rng_state())
        state = {
            "version": STATE_VERSION, "epoch": epoch, "micro": micro, "global_micro": micro,
            "global_step": res.global_step, "train_tokens": res.train_tokens, "train_seconds": res.train_seconds,
            "world_size": self.info.world_size, "micro_batches_per_step": self.info.world_size * self.cfg.grad_accum,
            "best_eval_loss": res.best_eval_loss, "best_epoch": res.best_epoch,
            "log_bytes": self.logger.size(),  # a resume cuts the log back to this: no duplicate lines
            "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
            "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        meta = {"epoch": epoch, "micro_batch": micro, "global_step": res.global_step,
                "best_eval_loss": res.best_eval_loss, "world_size": self.info.world_size, "config": asdict(self.cfg)}
        on_main(self.info, write_state if self.is_main else None, self.out / "state", tensors, state, meta)

    def _load_state(self, folder: Path) -> tuple[int, int, TrainResult]:
        tensors, state = read_resume_state(folder, {n: p.shape for n, p in self.named_params})
        try:
            load_optimizer_state_dict(self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ResumeError(f"{folder / 'state.pt'}: the optimizer state does not match this run ({err})") from None
        for n, p in self.named_params:
            load_full_tensor(p, tensors[n])  # into this rank's shard under FSDP
        invalidate_packs(self.train_module)  # the weights changed outside an optimizer step
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        world = self.info.world_size
        per_rank = state.get("rng_per_rank")
        set_rng_state(per_rank[self.info.rank] if per_rank and len(per_rank) == world else state["rng"])
        global_micro = state.get("global_micro", state["micro"] * state.get("world_size", 1))
        res = TrainResult(global_step=state["global_step"], epoch=state["epoch"],
                          best_eval_loss=state["best_eval_loss"], best_epoch=state.get("best_epoch"),
                          train_tokens=state["train_tokens"], train_seconds=state.get("train_seconds", 0.0))
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
        if self.out and "log_bytes" in state and folder.resolve() == (self.out / "state").resolve():
            self.logger.truncate(state["log_bytes"])  # drop the lines of steps done after this state was saved
        self.logger.log(event="resume", step=res.global_step, epoch=state["epoch"], micro_batch=global_micro,
                        world_size=world, saved_world_size=state.get("world_size", 1))
        return state["epoch"], global_micro, res


@torch.no_grad()
def evaluate_loss(module: torch.nn.Module, batches: Sequence[Any], collate_fn: Callable[[Any], Any],
                  info: DistInfo | None = None, device: torch.device | None = None) -> dict:
    """Σ loss / Σ items of `module(**collate_fn(spec)) -> (loss_sum, n)` over `batches`: {"eval_loss",
    "eval_tokens"}, or {} without batches. Under torchrun each rank scores its share (the same number of
    forwards on every rank, as FSDP needs) and the sums are all-reduced: the exact global mean."""
    if not batches:
        return {}
    info = info or DistInfo()
    total, n = 0.0, 0
    for spec, counted in shard_for_eval(batches, info.rank, info.world_size):
        batch = collate_fn(spec)
        loss_sum, k = module(**(_to_device(batch, device) if device is not None else batch))
        if counted:
            total, n = total + float(loss_sum), n + k
    total, n = all_reduce_sum([total, n])
    n = int(n)
    return {"eval_loss": total / max(n, 1), "eval_tokens": n}


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
