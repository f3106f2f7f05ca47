"""What several benches share, written once: the copy bandwidth behind the weight-read bound, interleaved timing,
greedy decoding on both sides, and the HF Trainer's collator + timer (bench.sft, bench.sft_gemma)."""
from __future__ import annotations

import statistics
import time

import torch


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + bytes written per second) of a big tensor copy, best of `repeats` (the pages
    faulted in first): what the weight-read bound of decoding divides by."""
    src = torch.empty(size_mb * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    nbytes = 2 * src.numel()
    del src, dst
    return nbytes / best / 1e9


def interleaved(fns: dict, repeats: int, warmups: dict | None = None) -> tuple[dict, dict]:
    """Median seconds per function, calls alternating (ours, HF, ours, HF, ...) so that load from other
    processes hits both alike. Each is warmed up first (with `warmups[name]` if given). Returns (times, outputs)."""
    for name in fns:
        (warmups or fns)[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            CPU_SHARE.append(cpu[name][-1] / times[name][-1])
    medians = {name: statistics.median(t) for name, t in times.items()}
    medians.update({f"{name}_cpu": statistics.median(t) for name, t in cpu.items()})
    return medians, outputs


CPU_SHARE: list[float] = []  # CPU seconds / wall seconds of each timed call: < threads means contention


@torch.inference_mode()
def ours_greedy(model, prompt: torch.Tensor, steps: int, banned: int | list[int] | None = None) -> torch.Tensor:
    """Greedy decoding on the causal-LM contract; `banned` ids (e.g. EOS) never chosen, as HF's min_new_tokens."""
    cache = model.new_cache()
    h = model.hidden_states(prompt, cache=cache)  # (B, T, H)
    logits = model.logits(h[:, -1:])              # (B, 1, V): the LM head on the last position only
    out = []
    while True:
        if banned is not None:
            logits[..., banned] = float("-inf")
        out.append(logits.argmax(-1))             # (B, 1)
        if len(out) == steps:
            return torch.cat(out, 1)
        logits = model(out[-1], cache=cache)[:, -1:]


@torch.inference_mode()
def hf_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


# --------------------------------------------------------------------------------------------------- HF
def hf_collator_and_timer(special: dict[str, int], pad: str, eos: str):
    """(DataCollatorForSeq2Seq, Timer callback) for an HF Trainer run on pre-tokenized rows: the collator only
    needs the pad id, so its tokenizer is a stub WordLevel over `special` (with "<unk>"); Timer.seconds = train()
    wall time."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, TrainerCallback

    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(special, unk_token="<unk>")),
                                   pad_token=pad, eos_token=eos)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    return DataCollatorForSeq2Seq(stub, padding=True, label_pad_token_id=-100), Timer
