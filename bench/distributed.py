"""LoRA SFT scaled out with torch.distributed: 1 process vs 2 (DDP), and DDP vs FSDP2 memory, in one run.

    flock /tmp/ohlora-heavy.lock python -m bench.distributed            # CPU: gloo, one thread per process
    python -m bench.distributed --layers 24 --hidden 2048 --bf16         # CUDA: NCCL over all visible GPUs

A mid-size GPT-NeoX (random weights, saved once as an HF folder that every process loads) is fine-tuned with
our SFT loop (`train.loop.Trainer` + `train.sft.CausalLMLoss`, LoRA on all four projections) on synthetic Q&A
batches: per rank `--batch` sequences of `--seq` tokens, the loss on the answer half. Three runs, each a fresh
`torchrun` (or plain) process group:

    single  1 process                 (the reference)
    ddp     N processes, DDP           tokens/s → scaling efficiency = tok/s(N) / (N · tok/s(1))
    fsdp    N processes, FSDP2         per-rank peak RSS → memory ratio = FSDP / DDP

Throughput is the median over the timed steps of (global non-pad tokens / step time), after `--warmup`
steps. Memory, per rank: the RSS resident once the model is set up (base weights — whole under DDP, 1/N under
FSDP — and adapter), the peak during training (the high-water mark is reset after set-up; activations are the
same in both, FSDP adds the all-gathered full weights of ~2 layers in flight) and the peak over the whole run
(loading included), each taken above the RSS of a bare `import torch` process. On CPU every process gets OMP_NUM_THREADS=1 so that
N processes use N cores, as on N GPUs; glibc's mmap threshold is pinned so freed tensors leave the RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(field: str = "VmRSS") -> float:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    from train.distributed import distributed_session, gather_objects, on_main

    base_rss = rss_mb()
    with distributed_session() as info:
        from train.loop import LoopConfig, Trainer
        from train.sft import CausalLMLoss
        from lora import LoRAConfig, inject_lora

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        from infer.models import inspect_model
        lora_cfg = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0,
                              target_modules=list(inspect_model(args.model).lora_targets))
        t0 = time.perf_counter()
        if args.worker == "fsdp" and info.enabled:
            from train.fsdp_model import build_fsdp_lora_model
            _, module, _ = build_fsdp_lora_model(args.model, dtype, lora_cfg, 0, info, CausalLMLoss)
        else:
            from infer.models import load_base_model
            model = load_base_model(args.model, dtype=dtype, device=info.device)
            torch.manual_seed(0)
            inject_lora(model, lora_cfg)
            module = CausalLMLoss(model)
        setup_s = time.perf_counter() - t0
        import gc
        gc.collect()
        setup_rss = rss_mb()  # what stays resident: base weights (whole or 1/N), adapter
        setup_peak = rss_mb("VmHWM")
        reset_peak_rss()

        vocab, seq, batch = args.vocab, args.seq, args.batch
        steps = args.warmup + args.steps
        n_global = steps * info.world_size  # one micro-batch per rank per step

        def collate(i: int) -> dict:
            g = torch.Generator().manual_seed(1000 + i)
            ids = torch.randint(3, vocab, (batch, seq), generator=g)
            labels = ids.clone()
            labels[:, : seq // 2] = -100  # the prompt half carries no loss, as in SFT
            return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

        out = Path(args.out) / args.worker
        cfg = LoopConfig(max_steps=steps, lr=1e-4, warmup_ratio=0.0, precision="bf16" if args.bf16 else "fp32",
                         output_dir=str(out), progress=False, eval_every_epoch=False, seed=0)
        trainer = Trainer(module, cfg, lambda epoch: list(range(n_global)), info=info, collate_fn=collate)
        trainer.fit()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        mine = {"rank": info.rank, "base_rss_mb": base_rss, "setup_rss_mb": setup_rss, "setup_peak_mb": setup_peak,
                "train_peak_mb": rss_mb("VmHWM"), "peak_mb": max(setup_peak, rss_mb("VmHWM")),
                "setup_s": setup_s,
                "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if info.device.type == "cuda" else None}
        ranks = gather_objects(mine)

        def report() -> None:
            from train.progress import read_jsonl
            rec = [r for r in read_jsonl(out / "log.jsonl") if "tokens_per_s" in r]
            timed = [r["tokens_per_s"] for r in rec[args.warmup:]]
            result = {"mode": args.worker, "world_size": info.world_size, "tokens_per_s": statistics.median(timed),
                      "tokens_per_s_all": timed, "ranks": ranks}
            (Path(args.out) / f"{args.worker}.json").write_text(json.dumps(result))
        on_main(info, report)


# ------------------------------------------------------------------------------------------ orchestrator
def build_model(folder: Path, args: argparse.Namespace) -> int:
    from gptneox.config import GPTNeoXConfig
    from gptneox.load import save_pretrained
    from gptneox.model import GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.5,
                        max_position_embeddings=max(512, args.seq))
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg)
    save_pretrained(model, folder)
    return model.num_parameters()


def launch(mode: str, nproc: int, args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    worker_args = ["-m", "bench.distributed", "--worker", mode, "--model", str(model_dir), "--out", str(out),
                   "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r)]
    if args.bf16:
        worker_args.append("--bf16")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *worker_args]
    else:
        cmd = [sys.executable, *worker_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads),
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"error: the {mode} run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads((out / f"{mode}.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--nproc", type=int, help="processes for the ddp/fsdp runs (default: #GPUs, else 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (CPU)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", choices=["single", "ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    cuda = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if cuda and torch.cuda.device_count() > 1 else 2)
    with tempfile.TemporaryDirectory(prefix="ohlora-bench-dist-") as tmp:
        tmp = Path(tmp)
        n_params = build_model(tmp / "model", args)
        print(f"GPT-NeoX {args.layers} layers × {args.hidden} hidden, vocab {args.vocab}: {n_params / 1e6:.1f} M "
              f"params ({'bf16' if args.bf16 else 'fp32'}), LoRA r={args.lora_r} on all projections | "
              f"{'CUDA, NCCL' if cuda else f'CPU, gloo, {args.threads} thread(s)/process'} | "
              f"per rank {args.batch}×{args.seq} tokens/step, {args.warmup} warm-up + {args.steps} timed steps",
              flush=True)
        res = {"single": launch("single", 1, args, tmp / "model", tmp)}
        for mode in ("ddp", "fsdp"):
            res[mode] = launch(mode, nproc, args, tmp / "model", tmp)

    print(f"\n{'run':<8}{'procs':>6}{'tok/s':>10}{'resident MB':>13}{'train peak MB':>15}{'peak MB':>9}"
          f"{'bare torch MB':>15}{'wall s':>8}     (per rank, the largest rank)")
    for mode, r in res.items():
        ranks = r["ranks"]
        print(f"{mode:<8}{r['world_size']:>6}{r['tokens_per_s']:>10.1f}{max(x['setup_rss_mb'] for x in ranks):>13.0f}"
              f"{max(x['train_peak_mb'] for x in ranks):>15.0f}{max(x['peak_mb'] for x in ranks):>9.0f}"
              f"{max(x['base_rss_mb'] for x in ranks):>15.0f}{r['wall_s']:>8.1f}")
    single, ddp, fsdp = res["single"], res["ddp"], res["fsdp"]
    eff = ddp["tokens_per_s"] / (nproc * single["tokens_per_s"])
    eff_fsdp = fsdp["tokens_per_s"] / (nproc * single["tokens_per_s"])

    def peak(r: dict, key: str) -> float:
        return max(x[key] for x in r["ranks"])

    def above_base(r: dict, key: str) -> float:
        return max(x[key] - x["base_rss_mb"] for x in r["ranks"])

    print(f"\nscaling efficiency, {nproc} processes vs 1: DDP {eff:.2f}  (FSDP {eff_fsdp:.2f})   "
          f"[{ddp['tokens_per_s']:.0f} vs {nproc}×{single['tokens_per_s']:.0f} tok/s]")
    def ratio(key: str) -> float:
        return above_base(fsdp, key) / above_base(ddp, key)

    print("memory ratio FSDP / DDP per rank (RSS above a bare `import torch` process):")
    print(f"  resident after set-up (weights + adapter)                         {ratio('setup_rss_mb'):.2f}")
    print(f"  peak during training (+ activations, FSDP's all-gathered layers)  {ratio('train_peak_mb'):.2f}")
    print(f"  peak over the whole run (loading included)                        {ratio('peak_mb'):.2f}"
          f"   [raw RSS {peak(fsdp, 'peak_mb'):.0f} vs {peak(ddp, 'peak_mb'):.0f} MB]")
    if cuda:
        cf = max(x["cuda_peak_mb"] for x in fsdp["ranks"])
        cd = max(x["cuda_peak_mb"] for x in ddp["ranks"])
        print(f"CUDA peak allocated per rank: FSDP {cf:.0f} MB vs DDP {cd:.0f} MB (ratio {cf / cd:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
