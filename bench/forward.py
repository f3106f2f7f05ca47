"""Our GPT-NeoX vs transformers on the Polyglot-Ko-1.3B shape (random weights), bf16, CPU — one run, same machine.

Prints: forward time (batch 4 x 128), 80 greedy decode steps (batch 1), the ratios, the weight-read bound of
decoding (bf16 weights bytes / measured memory bandwidth), and peak RSS of loading the sharded folder
(ours vs `from_pretrained`, each in a fresh subprocess).

    flock /tmp/ohlora-heavy.lock python -m bench.forward            # full run (~10 GB RAM peak, minutes)
    python -m bench.forward --layers 2 --repeats 1 --skip-rss       # quick smoke run
    python -m bench.forward --gemma [--dtype fp32]                  # the real gemma-3-270m: bench.forward_gemma.run

The random 1.3B folder (fp16, 3 shards + index, like the real download) is cached under /tmp.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import CPU_SHARE, hf_greedy, interleaved, memory_bandwidth_gbs, ours_greedy
from gptneox import GPTNeoXConfig, GPTNeoXForCausalLM, load_model, save_pretrained


def build_folder(config: GPTNeoXConfig, folder: Path) -> Path:
    """Random fp16 model saved as 3 shards + index (reused when config.json matches)."""
    marker = folder / "config.json"
    if marker.is_file() and GPTNeoXConfig.from_json(marker) == config and any(folder.glob("*.index.json")):
        return folder
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to(dtype=torch.float16).to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    with torch.no_grad():  # LayerNorm not exactly 1/0, so the comparison exercises them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    save_pretrained(model, folder, max_shard_size=-(-total // 3) + largest)  # greedy packing -> 3 shards
    return folder


def _meta_model(config: GPTNeoXConfig) -> GPTNeoXForCausalLM:
    with torch.device("meta"):
        return GPTNeoXForCausalLM(config)


RSS_SNIPPET = """
import sys, torch
def peak_mb():  # VmHWM: this process's own peak RSS (ru_maxrss can carry over the parent's peak across fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
which, folder = sys.argv[1], sys.argv[2]
if which == "ours":
    from gptneox import load_model
    base = peak_mb()
    model = load_model(folder, dtype=torch.bfloat16)
else:
    from transformers import GPTNeoXForCausalLM
    base = peak_mb()
    model = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
import resource
print(base, peak_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mb(which: str, folder: Path) -> tuple[float, float, float]:
    """(peak RSS after imports, peak RSS after loading, ru_maxrss) in MB, in a fresh subprocess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path.cwd()))
    out = subprocess.run([sys.executable, "-c", RSS_SNIPPET, which, str(folder)], check=True, env=env,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run (default: all 24)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3, help="timed forward passes per model")
    ap.add_argument("--decode-repeats", type=int, default=1, help="timed 80-step decodes per model")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--folder", default="/tmp/ohlora-bench-polyglot-1.3b")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--gemma", action="store_true", help="the real gemma-3-270m GGUF instead (bench.forward_gemma; "
                                                          "--steps/--repeats/--decode-repeats/--prompt-len apply, "
                                                          "--skip-rss skips its load subprocesses)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="with --gemma")
    args = ap.parse_args()
    if args.gemma:
        from bench.forward_gemma import run as run_gemma
        print(json.dumps(run_gemma(args.dtype, args.steps, args.repeats, args.decode_repeats, args.prompt_len,
                                   args.skip_rss)))
        return
    from transformers import GPTNeoXForCausalLM as HFModel

    config = GPTNeoXConfig.polyglot_ko_1_3b()
    folder = Path(args.folder)
    if args.layers:
        config = replace(config, num_hidden_layers=args.layers)
        folder = folder.with_name(folder.name + f"-{args.layers}l")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, config {config}")
    build_folder(config, folder)
    results: dict[str, float] = {}
    weight_mb = sum(p.numel() for p in _meta_model(config).parameters()) * 2 / 2**20
    if not args.skip_rss:  # first, in fresh subprocesses, before this process holds any weights
        for which in ("ours", "hf"):
            base, peak, maxrss = peak_rss_mb(which, folder)
            results[f"rss_{which}_mb"] = peak
            print(f"load peak RSS {which:4s}: {peak:,.0f} MB (after imports {base:,.0f} MB, "
                  f"+{peak - base:,.0f} MB for {weight_mb:,.0f} MB of bf16 weights; ru_maxrss {maxrss:,.0f} MB)")
        print(f"peak RSS HF/ours {results['rss_hf_mb'] / results['rss_ours_mb']:.2f}x\n")
    ours = load_model(folder, dtype=torch.bfloat16)
    hf = HFModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"parameters {ours.num_parameters():,} ({weight_bytes / 1e9:.2f} GB in bf16)")

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (4, 128), generator=g)
    with torch.inference_mode():
        diff = (ours(batch[:1, :32]).float() - hf(input_ids=batch[:1, :32]).logits.float()).abs().max().item()
    print(f"bf16 logits max |ours - HF| on 1x32: {diff:.3g}")

    with torch.inference_mode():
        times, _ = interleaved({"ours": lambda: ours(batch), "hf": lambda: hf(input_ids=batch).logits},
                               args.repeats)
    results["forward_ours"], results["forward_hf"] = times["ours"], times["hf"]
    results["forward_ours_cpu"], results["forward_hf_cpu"] = times["ours_cpu"], times["hf_cpu"]
    prompt = batch[:1, :args.prompt_len]
    times, outs = interleaved({"ours": lambda: ours_greedy(ours, prompt, args.steps),
                               "hf": lambda: hf_greedy(hf, prompt, args.steps)}, args.decode_repeats,
                              warmups={"ours": lambda: ours_greedy(ours, prompt, 4),
                                       "hf": lambda: hf_greedy(hf, prompt, 4)})
    results["decode_ours"], results["decode_hf"] = times["ours"], times["hf"]
    results["decode_ours_cpu"], results["decode_hf_cpu"] = times["ours_cpu"], times["hf_cpu"]
    same = (outs["ours"] == outs["hf"]).float().mean().item()

    bw = memory_bandwidth_gbs()
    bound = weight_bytes / (bw * 1e9)
    print(f"\nforward 4x128     ours {results['forward_ours']:.3f} s   HF {results['forward_hf']:.3f} s   "
          f"HF/ours {results['forward_hf'] / results['forward_ours']:.2f}x")
    per_ours = results["decode_ours"] / args.steps
    per_hf = results["decode_hf"] / args.steps
    print(f"decode {args.steps} steps (prompt {args.prompt_len}, incl. prefill)  ours {results['decode_ours']:.2f} s "
          f"({per_ours * 1e3:.1f} ms/token)   HF generate {results['decode_hf']:.2f} s ({per_hf * 1e3:.1f} ms/token)"
          f"   HF/ours {results['decode_hf'] / results['decode_ours']:.2f}x   greedy tokens equal: {same:.0%}")
    print(f"CPU seconds (all threads; robust to other processes taking cores): forward ours "
          f"{results['forward_ours_cpu']:.2f} HF {results['forward_hf_cpu']:.2f} -> HF/ours "
          f"{results['forward_hf_cpu'] / results['forward_ours_cpu']:.2f}x;  decode ours "
          f"{results['decode_ours_cpu']:.2f} HF {results['decode_hf_cpu']:.2f} -> HF/ours "
          f"{results['decode_hf_cpu'] / results['decode_ours_cpu']:.2f}x")
    print(f"memory copy bandwidth {bw:.1f} GB/s -> weight-read bound {bound * 1e3:.1f} ms/token "
          f"({weight_bytes / 1e9:.2f} GB / token); ours at {bound / per_ours:.0%} of the bound")
    print(f"cores busy during timed calls: {min(CPU_SHARE):.2f}-{max(CPU_SHARE):.2f} of {torch.get_num_threads()} "
          f"threads (below the thread count = other processes took CPU time)")
    results.update(cpu_share_min=min(CPU_SHARE), cpu_share_max=max(CPU_SHARE))
    results.update(bandwidth_gbs=bw, bound_s_per_token=bound, greedy_equal=same, logits_diff=diff)

    print(json.dumps(results))


if __name__ == "__main__":
    main()
