"""Our LoRA vs PEFT's, same weights, same run: training step and inference cost, and what merging saves.

A GPT-NeoX with Polyglot-Ko-1.3B's layer shape (hidden 2048, MLP 8192; fewer layers so it fits anywhere),
random weights, fp32 on CPU (or --device cuda --bf16). Ours = gptneox + lora; reference = transformers +
peft.get_peft_model with the same base weights and adapter config. Prints median times and the ratios:

  * train step (forward + backward on the LoRA weights) and eval forward, ours / PEFT;
  * each stack's LoRA overhead over its own base model (so a base-model speed difference does not hide in it);
  * our unmerged / merged forward: the inference cost merging removes;
  * first, one query_key_value-shaped layer alone (LoRALinear vs PEFT's lora.Linear), many short runs.

    flock /tmp/ohlora-heavy.lock python -m bench.lora                 # 4 layers, r=128, 4 targets (~3 GB RAM)
    python -m bench.lora --layers 1 --seq 64 --repeats 2              # quick smoke run
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace

import torch

import lora
from gptneox import GPTNeoXConfig, GPTNeoXForCausalLM, load_model, save_pretrained


def compare(fns: dict, repeats: int, device: str) -> dict:
    """Best time of each function, run round-robin so that load from other processes hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def layer_bench(r: int, repeats: int, device: str) -> None:
    """One Linear of query_key_value's shape: LoRALinear vs PEFT's lora.Linear, many short round-robin runs."""
    import peft
    from torch import nn

    torch.manual_seed(0)
    base = nn.Linear(2048, 6144, device=device)
    ours = lora.LoRALinear(copy.deepcopy(base), r=r, alpha=16, init=False).eval()
    holder = nn.Sequential()
    holder.add_module("qkv", copy.deepcopy(base))
    ref = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=16, target_modules=["qkv"],
                                                      init_lora_weights=False)).eval()
    layer = ref.base_model.model.qkv
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(256, 2048, device=device)
    with torch.no_grad():
        assert torch.allclose(ours(x), layer(x), atol=1e-5)
        t = compare({"base": lambda: base(x), "ours": lambda: ours(x), "peft": lambda: layer(x)}, repeats, device)
    print(f"one 2048->6144 Linear, x (256, 2048), r={r}, best of {repeats}: base {t['base'] * 1e3:.2f} ms, "
          f"LoRALinear {t['ours'] * 1e3:.2f} ms, PEFT {t['peft'] * 1e3:.2f} ms; ours/PEFT = "
          f"{t['ours'] / t['peft']:.3f}, ours/base = {t['ours'] / t['base']:.3f} "
          f"(FLOP ratio {1 + r * (2048 + 6144) / (2048 * 6144):.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--targets", nargs="+", default=list(GPTNeoXForCausalLM.LORA_TARGETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 base + bf16 autocast (adapters stay fp32)")
    args = p.parse_args()

    import peft  # references: bench/ may import them
    import transformers

    layer_bench(args.r, max(20, 4 * args.repeats), args.device)

    config = replace(GPTNeoXConfig.polyglot_ko_1_3b(), num_hidden_layers=args.layers)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(GPTNeoXForCausalLM(config), tmp)
        ours = load_model(tmp, dtype=dtype, device=args.device)
        hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)

    def forward(model, is_hf):
        with torch.no_grad(), autocast:
            return model(input_ids=ids).logits if is_hf else model(ids)

    base_ours, base_hf = copy.deepcopy(ours).eval(), copy.deepcopy(hf).eval()   # un-adapted references
    cfg = lora.LoRAConfig(r=args.r, alpha=16, dropout=0.05, target_modules=args.targets)
    report = lora.inject_lora(ours, cfg)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=args.targets, task_type="CAUSAL_LM"))
    with torch.no_grad():   # same non-zero adapter in both
        for name, layer in lora.lora_layers(ours):
            layer.lora_B.weight.normal_(std=0.01)
            for part in ("lora_A", "lora_B"):
                ref.get_parameter(f"base_model.model.{name}.{part}.default.weight").copy_(
                    getattr(layer, part).weight)

    def train_step(model, is_hf):
        model.train()
        with autocast:
            logits = model(input_ids=ids).logits if is_hf else model(ids)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    merged = lora.merge_lora(copy.deepcopy(ours)).eval()
    ours.eval(), ref.eval()
    t = compare({"base ours": lambda: forward(base_ours, False), "base hf": lambda: forward(base_hf, True),
                 "lora ours": lambda: forward(ours, False), "lora peft": lambda: forward(ref, True),
                 "merged ours": lambda: forward(merged, False)}, args.repeats, args.device)
    t |= compare({"train ours": lambda: train_step(ours, False), "train peft": lambda: train_step(ref, True)},
                 args.repeats, args.device)
    ours.eval(), ref.eval()
    diff = (forward(ours, False).float() - forward(ref, True).float()).abs().max().item()
    effect = (forward(ours, False).float() - forward(base_ours, False).float()).abs().max().item()

    ms = {k: v * 1e3 for k, v in t.items()}
    print(f"{args.layers} GPT-NeoX layers of Polyglot-Ko-1.3B shape, {args.device}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, batch {args.batch} x {args.seq}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats} (round-robin)")
    print(report)
    print(f"max |logits ours - PEFT| = {diff:.2e}   (the adapter moves logits by up to {effect:.2e})")
    print(f"base forward       ours {ms['base ours']:8.1f} ms   transformers {ms['base hf']:8.1f} ms")
    print(f"LoRA train step    ours {ms['train ours']:8.1f} ms   PEFT {ms['train peft']:8.1f} ms   "
          f"ours/PEFT = {t['train ours'] / t['train peft']:.2f}")
    print(f"LoRA eval forward  ours {ms['lora ours']:8.1f} ms   PEFT {ms['lora peft']:8.1f} ms   "
          f"ours/PEFT = {t['lora ours'] / t['lora peft']:.2f}")
    print(f"LoRA forward over own base: ours {t['lora ours'] / t['base ours']:.3f}x   "
          f"PEFT {t['lora peft'] / t['base hf']:.3f}x")
    print(f"merged forward     ours {ms['merged ours']:8.1f} ms   unmerged/merged = "
          f"{t['lora ours'] / t['merged ours']:.3f}   merged/base = {t['merged ours'] / t['base ours']:.3f}")


if __name__ == "__main__":
    main()
