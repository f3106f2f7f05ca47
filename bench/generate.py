"""Decoding speed: our sampler (infer.sampler) vs HF `generate`, and the weight-read bound.

    flock /tmp/ohlora-heavy.lock python -m bench.generate [--new-tokens 80] [--prompt-len 32] [--repeats 2]

Polyglot-Ko-1.3B configuration with random weights in bf16 on the CPU, batch 1, greedy. HF's model is built
first and our model takes the *same tensors* (`load_state_dict(assign=True)`: one copy of the weights in
memory, identical numbers), so the two greedy outputs can also be compared token by token. Both are forced to
produce exactly `--new-tokens` tokens: HF with `min_new_tokens` (EOS suppressed), ours with no EOS id and a
stop string that never matches — our run still pays for incremental decoding and the stop-string check every
step (a stand-in decoder maps ids to Hangul syllables, as cheap as the real BPE decode of 1-2 tokens).

The bound: batch-1 decoding must read every weight matrix once per token (all parameters but the input
embedding, which is a row gather), so tokens/s <= memory bandwidth / weight bytes. Bandwidth is measured here
with a large bf16 tensor copy (bytes read + bytes written per second). Only ratios within one run count: the
CPU differs from day to day.

Our model is timed twice: with plain `nn.Linear` layers, and after `core.onednn.pack_linears` (oneDNN
pre-packed weights, bitwise equal in bf16), which is what `python -m chat` runs. The three timings are
interleaved repeat by repeat (best of `--repeats` each), so a change of load on a shared machine hits all alike. `speedup_vs_hf` is the
packed path; `plain_speedup_vs_hf` the other.

`run(...) -> dict` is the API bench/sft.py calls.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from core.onednn import pack_linears  # noqa: E402
from infer.sampler import SamplingConfig, generate_ids  # noqa: E402


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), best of `repeats`."""
    src = torch.ones(megabytes * 2 ** 20 // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / best / 1e9


def build_models(num_layers: int | None = None, seed: int = 0):
    """(ours, hf, config): random Polyglot-Ko-1.3B (or its first `num_layers` layers) in bf16, shared weights."""
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM as HFModel

    from gptneox.config import GPTNeoXConfig
    from gptneox.load import KEY_ALIASES
    from gptneox.model import GPTNeoXForCausalLM

    config = GPTNeoXConfig.polyglot_ko_1_3b()
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)   # initialise straight in bf16 (no fp32 copy of 1.3B weights)
    try:
        hf = HFModel(HFConfig(**config.to_hf_dict())).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.device("meta"):
        ours = GPTNeoXForCausalLM(config)
    hf_state = {KEY_ALIASES.get(k, k): v for k, v in hf.state_dict().items()}  # transformers 5's lm_head name
    wanted = ours.state_dict().keys()
    missing = set(wanted) - set(hf_state)
    if missing:
        raise RuntimeError(f"HF state_dict lacks {sorted(missing)[:4]}")
    ours.load_state_dict({k: hf_state[k] for k in wanted}, assign=True)
    return ours.eval(), hf, config


def _shared_copy(model):
    """Another GPTNeoXForCausalLM holding the very same tensors (no copy)."""
    from gptneox.model import GPTNeoXForCausalLM
    with torch.device("meta"):
        twin = GPTNeoXForCausalLM(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every parameter a decode step reads (all but the input embedding, a row gather)."""
    # the input embedding is a row gather, unless it is also the (tied) LM head, which every step reads whole
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip = embeddings - {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def _hangul_decode(ids: list[int]) -> str:
    return "".join(chr(0xAC00 + i % 11172) for i in ids)


def time_ours(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    cfg = SamplingConfig(do_sample=False, max_new_tokens=new_tokens, stop_strings=("(답변 종료)",), no_repeat_ngram_size=0)
    t0 = time.perf_counter()
    out = generate_ids(model, input_ids, None, cfg, eos_token_id=None, decode=_hangul_decode)
    elapsed = time.perf_counter() - t0
    assert len(out[0]) == new_tokens, len(out[0])
    return elapsed, out[0]


def time_hf(hf, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=1, eos_token_id=2)
        elapsed = time.perf_counter() - t0
    tokens = out[0, input_ids.shape[1]:].tolist()
    assert len(tokens) == new_tokens, len(tokens)
    return elapsed, tokens


def run(new_tokens: int = 80, prompt_len: int = 32, repeats: int = 2, num_layers: int | None = None,
        with_hf: bool = True, seed: int = 0, verbose: bool = True) -> dict:
    """Tokens/s of ours and HF's batch-1 greedy decoding (best of `repeats`, prefill included), the bound."""
    say = print if verbose else (lambda *a, **k: None)
    bandwidth = measure_bandwidth()
    ours, hf, config = build_models(num_layers, seed)
    nbytes = weight_bytes_per_token(ours)
    bound = bandwidth * 1e9 / nbytes
    ids = torch.randint(3, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    say(f"config: polyglot-ko-1.3b{'' if num_layers is None else f' ({num_layers} layers)'}, bf16, CPU, "
        f"{torch.get_num_threads()} threads, batch 1, prompt {prompt_len} + {new_tokens} new tokens")
    say(f"weights read per token {nbytes / 1e9:.2f} GB, copy bandwidth {bandwidth:.1f} GB/s "
        f"-> bound {bound:.2f} tok/s")

    # A second model on the same dense tensors, packed (new oneDNN copies; the dense ones stay for the others).
    packed = _shared_copy(ours)
    n_packed = pack_linears(packed)          # what python -m chat does after merging the adapter
    timers = {"plain": (time_ours, ours), "packed": (time_ours, packed)}
    if with_hf:
        timers["hf"] = (time_hf, hf)
    for timer, model in timers.values():
        timer(model, ids, 4)                                                  # warm-up (allocator, kernels)
    best = {name: float("inf") for name in timers}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):              # interleaved, so a load change on the machine hits all three alike
        for name, (timer, model) in timers.items():
            seconds, toks = timer(model, ids, new_tokens)
            best[name] = min(best[name], seconds)
            tokens.setdefault(name, toks)

    result = {"new_tokens": new_tokens, "prompt_len": prompt_len, "threads": torch.get_num_threads(),
              "bandwidth_gb_s": bandwidth, "weight_gb_per_token": nbytes / 1e9, "bound_tok_s": bound,
              "packed_layers": n_packed, "ours_plain_tok_s": new_tokens / best["plain"],
              "ours_tok_s": new_tokens / best["packed"]}
    result["ours_fraction_of_bound"] = result["ours_tok_s"] / bound
    say(f"ours, nn.Linear:        {result['ours_plain_tok_s']:6.2f} tok/s "
        f"({100 * result['ours_plain_tok_s'] / bound:.0f}% of the bound)")
    say(f"ours, packed ({n_packed} lin.): {result['ours_tok_s']:6.2f} tok/s "
        f"({100 * result['ours_fraction_of_bound']:.0f}% of the bound)")
    if with_hf:
        result["hf_tok_s"] = new_tokens / best["hf"]
        result["hf_fraction_of_bound"] = result["hf_tok_s"] / bound
        same = min(next((i for i, (a, b) in enumerate(zip(tokens[k], tokens["hf"])) if a != b), new_tokens)
                   for k in ("plain", "packed"))
        result.update(speedup_vs_hf=best["hf"] / best["packed"], plain_speedup_vs_hf=best["hf"] / best["plain"],
                      identical_prefix_tokens=same)
        say(f"HF generate:            {result['hf_tok_s']:6.2f} tok/s ({100 * result['hf_fraction_of_bound']:.0f}% "
            "of the bound)")
        say(f"ours / HF = {result['speedup_vs_hf']:.2f}x packed, {result['plain_speedup_vs_hf']:.2f}x with nn.Linear "
            f"(greedy tokens equal to HF's for the first {same} of {new_tokens})")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=80)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="use only this many layers (a quick smoke run)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF reference")
    args = p.parse_args(argv)
    if min(args.new_tokens, args.prompt_len, args.repeats) < 1:
        print("error: --new-tokens, --prompt-len and --repeats must be >= 1", file=sys.stderr)
        return 2
    run(args.new_tokens, args.prompt_len, args.repeats, args.layers, not args.no_hf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
