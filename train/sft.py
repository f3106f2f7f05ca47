"""`python -m train.sft`: LoRA supervised fine-tuning of a GPT-NeoX model on Q&A pairs.

With no `--model` it builds the bundled tiny default (see train/default_model.py) into OUT/base and fine-tunes
it with settings that visibly learn in ~2 minutes on 2 CPU cores. With `--model DIR` (any GPT-NeoX HF folder,
e.g. polyglot-ko-1.3b) the defaults are the original Oh-LoRA's: r=128, α=16, dropout 0.05, lr 2e-4, batch 4.

Output (OUT = --output-dir, default runs/sft):
    OUT/base/          the default tiny base model + tokenizer (only without --model)
    OUT/best/          adapter (PEFT format) with the lowest eval loss + training_args.json
    OUT/last/          adapter after the last epoch + training_args.json
    OUT/state/         resume state (--resume OUT/state)
    OUT/log.jsonl      one JSON line per step / eval;   OUT/loss.png  the loss curves

Speed: the loss module runs the transformer (`model.gpt_neox`) once, gathers the hidden states of the
positions that carry a label (the answer), and applies the LM head + cross-entropy only there, in chunks —
never a (B, T, vocab) logits tensor. Right padding with causal attention means real tokens never see a pad,
so no attention mask is passed (SDPA's causal fast path); length-bucketed batches keep pads rare.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.sft import (IGNORE_INDEX, PromptTemplate, SFTDataError, collate, encode_pairs,
                      length_bucketed_batches, load_sft_csv, padding_stats, perplexity)
from train.default_model import DefaultModelSpec, build_default_base, bundled_data_path
from train.distributed import (all_reduce_sum, fail_fast_on_collective_error, init_distributed, on_main,
                               shard_for_eval)
from train.loop import LoopConfig, NonFiniteLossError, ResumeError, Trainer

ORIGINAL_TARGETS = ["query_key_value"]
ALL_NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions only.

    input_ids, labels: (B, T), right-padded; labels[b, t] = -100 where no loss. Position t predicts token t+1:
        hidden = gpt_neox(input_ids[:, :-1])             (B, T-1, H)
        keep   = labels[:, 1:] != -100                   (B, T-1)
        h      = hidden[keep]                            (N, H)   N = answer tokens in the batch
        loss   = Σ CE(embed_out(h) , labels[:, 1:][keep])  over chunks of ≤ `chunk` rows, logits in fp32
    Returns (loss_sum, N). Equal to F.cross_entropy over the full logits with ignore_index=-100, times N.
    """

    def __init__(self, model: torch.nn.Module, chunk: int = 1024):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        # attention_mask is not needed: pads sit on the right and attention is causal (see module doc).
        # The last column predicts nothing (causal: no earlier position needs it either), so it is not fed.
        hidden = self.model.gpt_neox(input_ids[:, :-1])             # (B, T-1, H)
        targets = labels[:, 1:]                                     # (B, T-1)
        keep = targets != IGNORE_INDEX
        h = hidden[keep]                                            # (N, H)
        y = targets[keep]                                           # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, y.numel(), self.chunk):
            logits = self.model.embed_out(h[s:s + self.chunk]).float()  # (n, V)
            total = total + F.cross_entropy(logits, y[s:s + self.chunk], reduction="sum")
        return total, int(y.numel())


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
    lora_targets: list


ORIGINAL = Defaults(lora_r=128, lora_alpha=16, lr=2e-4, epochs=3, batch_size=4, max_length=512,
                    warmup_ratio=0.03, lora_targets=ALL_NEOX_TARGETS)
TINY_DEMO = Defaults(lora_r=16, lora_alpha=32, lr=6e-3, epochs=8, batch_size=8, max_length=256,
                     warmup_ratio=0.05, lora_targets=ALL_NEOX_TARGETS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="GPT-NeoX HF folder (config.json, *.safetensors, tokenizer.json); default: build the "
                      "bundled tiny model into OUT/base")
    a("--data", help="Q&A CSV (columns split,input_data,output_data; the original's data_type layout works)")
    a("--input-column", default="input_data")
    a("--output-column", default="output_data")
    a("--split-column", default=None, help="default: 'split' or 'data_type' if present, else all rows train")
    a("--output-dir", default="runs/sft")
    a("--epochs", type=int, help=f"default {ORIGINAL.epochs} ({TINY_DEMO.epochs} for the tiny default)")
    a("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    a("--lora-r", type=int, help=f"default {ORIGINAL.lora_r} ({TINY_DEMO.lora_r} for the tiny default)")
    a("--lora-alpha", type=float, help=f"default {ORIGINAL.lora_alpha} ({TINY_DEMO.lora_alpha} tiny default)")
    a("--lora-dropout", type=float, default=0.05)
    a("--lora-init", choices=["kaiming", "gaussian"], default=None,
      help="init of lora_A: kaiming (PEFT's default, ours) or gaussian (the original's); default kaiming")
    a("--original-lora", action="store_true",
      help="the original Oh-LoRA adapter: r=128, alpha=16, dropout 0.05, gaussian init, query_key_value only "
           "(explicit --lora-* flags still win)")
    a("--lora-targets", nargs="+", help="Linear names (suffixes); default all four GPT-NeoX ones; "
                                         "'query_key_value' = the original")
    a("--lr", type=float, help=f"peak lr, default {ORIGINAL.lr} ({TINY_DEMO.lr} for the tiny default)")
    a("--weight-decay", type=float, default=0.0)
    a("--batch-size", type=int, help=f"default {ORIGINAL.batch_size} ({TINY_DEMO.batch_size} tiny default)")
    a("--grad-accum", type=int, default=1)
    a("--max-length", type=int, help=f"tokens per example, default {ORIGINAL.max_length}")
    a("--warmup-ratio", type=float)
    a("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"])
    a("--max-grad-norm", type=float, default=1.0)
    a("--resume", help="continue from a state folder (OUT/state of an earlier run)")
    a("--seed", type=int, default=42)
    a("--bf16", action="store_true", help="bf16 base weights + bf16 autocast (CPU or CUDA); LoRA stays fp32")
    a("--fp16", action="store_true", help="fp16 autocast (CUDA only)")
    a("--dtype", choices=["fp32", "bf16", "fp16"], help="base weight dtype (default: bf16 with --bf16)")
    a("--grad-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    a("--eval-prompts", type=int, default=3, help="sample answers generated at each eval (0: none)")
    a("--save-state-steps", type=int, help="also save resume state every N steps")
    a("--stop-after-steps", type=int, help=argparse.SUPPRESS)  # simulate an interruption (tests)
    a("--device", default=None, help="cpu / cuda (default: cuda if available)")
    a("--threads", type=int, help="CPU intra-op threads (default: 1 for the tiny default model — small "
                                  "matmuls gain little from more and suffer badly on a busy machine; "
                                  "torch's default otherwise)")
    a("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 (each rank holds 1/N of "
                                          "the base weights) instead of DDP (a full copy per rank)")
    a("--no-progress", action="store_true")
    # tiny default model overrides
    a("--default-layers", type=int, default=DefaultModelSpec.num_hidden_layers)
    a("--default-hidden", type=int, default=DefaultModelSpec.hidden_size)
    a("--default-vocab", type=int, default=DefaultModelSpec.vocab_size)
    a("--default-pretrain-epochs", type=int, default=DefaultModelSpec.pretrain_epochs)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    d = TINY_DEMO if args.model is None else ORIGINAL
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
    args.dtype = args.dtype or ("bf16" if args.bf16 else "fp32")
    return args


def _load_base(model_dir: Path, dtype: torch.dtype, device: torch.device):
    from gptneox.load import load_model
    from gptneox.tokenizer import Tokenizer

    _load_base_check(model_dir)
    return load_model(model_dir, dtype=dtype, device=device), Tokenizer.from_folder(model_dir)


def _load_base_check(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: --model folder not found")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json — not a GPT-NeoX HF model folder")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json next to the model")


def run(argv: list[str] | None = None) -> dict:
    args = resolve(build_parser().parse_args(argv))
    info = init_distributed(args.device)
    threads = args.threads or (1 if args.model is None else None)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.output_dir)
    data_path = Path(args.data) if args.data else bundled_data_path()
    data = load_sft_csv(data_path, args.input_column, args.output_column, args.split_column)
    show = info.is_main and not args.no_progress
    if args.model is None:
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
    lora_cfg = LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          target_modules=list(args.lora_targets),
                          init="gaussian" if args.lora_init == "gaussian" else True)
    fsdp = args.fsdp and info.enabled
    if args.fsdp and not info.enabled and info.is_main:
        print("note: --fsdp needs several processes (torchrun --nproc-per-node N); running one plain process",
              file=sys.stderr)
    if fsdp:
        if args.precision == "fp16":
            raise ValueError("--fp16 with --fsdp is not supported (no sharded grad scaler); use --bf16")
        from gptneox.tokenizer import Tokenizer
        from train.fsdp_model import build_fsdp_lora_model
        _load_base_check(model_dir)
        # built on the meta device and sharded before any weight is read: no rank ever holds the whole base
        model, loss_module, report = build_fsdp_lora_model(model_dir, dtype, lora_cfg, args.seed, info,
                                                           CausalLMLoss)
        tokenizer = Tokenizer.from_folder(model_dir)
    else:
        model, tokenizer = _load_base(model_dir, dtype, info.device)
        torch.manual_seed(args.seed)  # the adapter's A init
        report = inject_lora(model, lora_cfg)
        loss_module = CausalLMLoss(model)  # the Trainer wraps it in DDP under torchrun
    model.gpt_neox.gradient_checkpointing = bool(args.grad_checkpointing)

    template = PromptTemplate()
    train_set = encode_pairs(tokenizer, template, data.train, args.max_length)
    valid_set = encode_pairs(tokenizer, template, data.valid, args.max_length)
    lengths = [len(e) for e in train_set.examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not train_set.examples:
        raise SFTDataError(f"{data_path}: no training example left after truncation to {args.max_length}")
    if info.is_main:
        n_trunc = train_set.n_truncated + valid_set.n_truncated
        if n_trunc:
            print(f"warning: {n_trunc} example(s) longer than --max-length {args.max_length} were truncated"
                  + (f"; {train_set.n_dropped + valid_set.n_dropped} dropped (no answer token left)"
                     if train_set.n_dropped + valid_set.n_dropped else ""), file=sys.stderr)
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
        try:
            from train.sampler import SamplingConfig, generate
        except ImportError:  # the sampler lands separately; training works without it
            return {}
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
        if samples_holder.get("samples") and not result.stopped_early:
            print("Sample answers for validation prompts:")
            for q, a_ in samples_holder["samples"]:
                print(f"  Q: {q}\n  A: {a_}")
    return {"result": result, "model": model, "tokenizer": tokenizer, "model_dir": model_dir,
            "samples": samples_holder.get("samples", []), "out": out}


def main(argv: list[str] | None = None) -> int:
    try:
        with fail_fast_on_collective_error():  # a dead / hung rank: one clear line, exit 1, no hang
            run(argv)
    except (SFTDataError, ResumeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from train.distributed import cleanup
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
