"""infer.sampler: KV cache vs recompute, stop strings over split tokens, per-row stopping, HF parity, streaming."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.tokenizer import Tokenizer
from infer.sampler import (
    IncrementalDecoder,
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    banned_by_ngrams,
    generate,
    generate_batch,
    generate_ids,
    stop_prefix_len,
)
from tests.neox_fixtures import KOREAN_TEXTS, save_tiny_hf_neox, train_tiny_tokenizer

STOP = "(답변 종료)"


# ---------------------------------------------------------------------------------------------------------
# Helpers: a tokenizer and a language model whose output we script token by token
# ---------------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # the marker is frequent in the training text, so BPE makes it 4 tokens: " (", "답변", " 종료", ")"
    folder = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts=KOREAN_TEXTS * 4 + ["안녕 (답변 종료)"] * 40)
    return Tokenizer.from_folder(folder)


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (a Korean syllable becomes 3 tokens)."""
    b2u = _bytes_to_unicode()
    return [tok.tokenizer.token_to_id(b2u[b]) for b in text.encode("utf-8")]


class ScriptedLM(nn.Module):
    """Puts all probability on a scripted token per row and step: scripts[trial][row][step].

    Works with and without a cache (the step is the sequence length minus the prompt length); every
    `new_cache()` call starts the next trial (for the empty-answer retry)."""

    def __init__(self, scripts: list[list[list[int]]], vocab: int, filler: int):
        super().__init__()
        self.scripts, self.vocab, self.filler = scripts, vocab, filler
        self.trial = -1
        self.prompt_len: int | None = None

    class Cache:
        length = 0

    def new_cache(self):
        self.trial += 1
        self.prompt_len = None
        return ScriptedLM.Cache()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        B, T = input_ids.shape
        if self.prompt_len is None:
            self.prompt_len = T
        total = (cache.length + T) if cache is not None else T
        if cache is not None:
            cache.length = total
        step = total - self.prompt_len
        script = self.scripts[min(self.trial, len(self.scripts) - 1)]
        logits = torch.zeros(B, T, self.vocab)
        for r in range(B):
            row = script[r]
            logits[r, -1, row[step] if step < len(row) else self.filler] = 10.0
        return logits


def tiny_model(seed: int = 0, vocab: int = 320):
    from gptneox.config import GPTNeoXConfig
    from gptneox.model import GPTNeoXForCausalLM
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=256)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # larger weights so the argmax is decisive and changes from step to step
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


GREEDY = SamplingConfig(do_sample=False, max_new_tokens=24, stop_strings=())


# ---------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------

def test_repetition_penalty_hand_case_and_hf():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]

    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.3), ref, rtol=0, atol=0)


def test_top_k_top_p_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(1)
    scores = torch.randn(4, 100) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(apply_top_k(scores, 7), TopKLogitsWarper(7)(ids, scores.clone()))
    assert (apply_top_k(scores, 7) > float("-inf")).sum(-1).tolist() == [7, 7, 7, 7]
    for p in (0.3, 0.9):
        assert torch.equal(apply_top_p(scores, p), TopPLogitsWarper(p)(ids, scores.clone()))


def test_incremental_decoder_holds_incomplete_utf8(tokenizer):
    text = "안녕 (답변 종료)!"
    ids = byte_ids(tokenizer, text)
    dec = IncrementalDecoder(lambda i: tokenizer.decode(i))
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["", "", "안"]               # 3 bytes of one syllable: emitted on the third
    dec = IncrementalDecoder(lambda i: tokenizer.decode(i))
    cut = [dec.push(i) for i in byte_ids(tokenizer, "안녕")[:5]]   # generation ends inside the second syllable
    assert "".join(cut) + dec.flush() == "안"                        # the cut character is dropped, not U+FFFD


def test_earliest_of_several_stop_strings_wins():
    from infer.sampler import RowText
    vocab = {1: "안녕 ", 2: "xA y B z", 3: "C"}
    row = RowText(lambda ids: "".join(vocab[i] for i in ids), ("B", "A"), 0, None)
    assert row.push(1) is False and row.push(2) is True       # both complete in one piece: "A" comes first
    assert row.finish() == "안녕 x"


def test_stop_prefix_len():
    assert stop_prefix_len("좋아 (답", [STOP]) == 2
    assert stop_prefix_len("좋아 (답변 종료", [STOP]) == 6
    assert stop_prefix_len("좋아", [STOP]) == 0
    assert stop_prefix_len("(", [STOP, "끝"]) == 1


# ---------------------------------------------------------------------------------------------------------
# Stop strings, per-row stopping, streaming, retry (scripted model)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["tokens", "bytes"])
def test_stop_string_split_over_tokens_stops_and_is_cut(tokenizer, split):
    answer = tokenizer.encode("오늘 친구랑 카페")
    if split == "tokens":   # the marker as the tokenizer writes it: 4 BPE tokens
        marker = tokenizer.encode(" (답변 종료)")
        assert [tokenizer.decode([i]) for i in marker] == [" (", "답변", " 종료", ")"]
    else:                   # one token per byte: even the syllables are split
        marker = byte_ids(tokenizer, " (답변 종료)")
    after = tokenizer.encode(" 더 말할래")
    script = answer + marker + after
    model = ScriptedLM([[script]], tokenizer.vocab_size, filler=tokenizer.encode("!")[0])
    prompt = torch.tensor([tokenizer.encode("오늘 뭐 해?")])
    out = generate_batch(model, prompt, None, SamplingConfig(do_sample=False, max_new_tokens=60),
                         eos_token_id=tokenizer.eos_token_id, decode=tokenizer.decode)
    assert out.texts == ["오늘 친구랑 카페"]
    assert out.finish_reasons == ["stop"]
    assert out.token_ids == [answer + marker]          # generation stopped on the token completing the marker
    assert len(marker) >= 3


def test_per_row_stopping_no_leak(tokenizer):
    eos = tokenizer.eos_token_id
    junk = tokenizer.encode(" 누설")
    r0 = tokenizer.encode("안녕") + tokenizer.encode(" (답변 종료)") + junk * 5
    r1 = tokenizer.encode("비 오는 날에는 집에서") + [eos] + junk * 5
    r2 = tokenizer.encode("Hello")
    model = ScriptedLM([[r0, r1, r2]], tokenizer.vocab_size, filler=tokenizer.encode("!")[0])
    ids, mask = tokenizer.batch_encode(["오늘 뭐 해?", "안녕", "비 오는 날에는 집에서 영화"], padding_side="left")
    assert mask[:, 0].tolist().count(0) >= 1                 # really left-padded
    cfg = SamplingConfig(do_sample=False, max_new_tokens=30, no_repeat_ngram_size=0)   # the script repeats '!'
    out = generate_batch(model, ids, mask, cfg, eos_token_id=eos, decode=tokenizer.decode)
    assert out.texts[0] == "안녕" and out.texts[1] == "비 오는 날에는 집에서"
    assert out.texts[2] == "Hello" + "!" * (30 - len(r2))
    assert out.finish_reasons == ["stop", "eos", "length"]
    n1 = len(tokenizer.encode("비 오는 날에는 집에서"))
    assert out.token_ids[1] == r1[:n1] and len(out.token_ids[2]) == 30
    assert all("누설" not in t for t in out.texts)


def test_stream_concatenation_equals_answer(tokenizer):
    # leading space, bytes of split syllables, a "(답" that is NOT the marker, trailing spaces before the marker
    r0 = (tokenizer.encode("  ") + byte_ids(tokenizer, "답장 (답장) 좋아") + tokenizer.encode("   ")
          + byte_ids(tokenizer, "(답변 종료)") + tokenizer.encode("뒤"))
    r1 = tokenizer.encode("카페 (") + tokenizer.encode("답변") + tokenizer.encode(" 끝")   # ends on max tokens
    model = ScriptedLM([[r0, r1]], tokenizer.vocab_size, filler=tokenizer.encode(" ")[0])
    pieces: dict[int, list[str]] = {0: [], 1: []}
    tok = tokenizer
    answers = generate(model, tok, ["a", "b"], SamplingConfig(do_sample=False, max_new_tokens=len(r0) + 2,
                                                                     no_repeat_ngram_size=0),
                       stream=lambda r, p: pieces[r].append(p))
    assert answers == ["답장 (답장) 좋아", "카페 (답변 끝"]
    for r in (0, 1):
        assert "".join(pieces[r]) == answers[r]
        assert all(p for p in pieces[r])
    assert len(pieces[0]) >= 5                               # really streamed, not one final chunk
    assert pieces[1] == ["카페", " (답변 끝"]                # " (답변" held back until it cannot be the marker
    assert STOP not in "".join(pieces[0])


def test_empty_answer_is_retried(tokenizer):
    stop = tokenizer.encode(STOP)
    empty = tokenizer.encode("  ") + stop                     # an answer that is empty after cutting
    good = tokenizer.encode("안녕!") + stop
    cfg = SamplingConfig(temperature=0.6, max_new_tokens=20, seed=0)
    model = ScriptedLM([[empty], [empty], [good]], tokenizer.vocab_size, filler=0)
    assert generate(model, tokenizer, ["hi"], cfg) == ["안녕!"]
    assert model.trial == 2                                  # three generations in all
    model = ScriptedLM([[empty], [good]], tokenizer.vocab_size, filler=0)
    assert generate(model, tokenizer, ["hi"], SamplingConfig(max_trials=1, max_new_tokens=20)) == [""]
    assert model.trial == 0
    model = ScriptedLM([[empty], [good]], tokenizer.vocab_size, filler=0)   # greedy: deterministic, one trial
    assert generate(model, tokenizer, ["hi"], SamplingConfig(do_sample=False, max_new_tokens=20)) == [""]


# ---------------------------------------------------------------------------------------------------------
# Real model: KV cache vs recompute, top-k=1, HF parity
# ---------------------------------------------------------------------------------------------------------

def test_greedy_with_cache_equals_recompute():
    model = tiny_model()
    torch.manual_seed(5)
    ids = torch.randint(3, 320, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    cached = generate_ids(model, ids, mask, GREEDY)
    recomputed = generate_ids(model, ids, mask, GREEDY, use_cache=False)
    assert cached == recomputed
    assert all(len(row) == 24 for row in cached)
    assert len(set(cached[0])) > 3                            # not a degenerate constant output


def test_top_k_1_equals_greedy():
    model = tiny_model(seed=1)
    ids = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(2))
    greedy = generate_ids(model, ids, None, GREEDY)
    sampled = generate_ids(model, ids, None, SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=24,
                                                            stop_strings=(), seed=3))
    free = generate_ids(model, ids, None, SamplingConfig(temperature=1.5, max_new_tokens=24, stop_strings=(),
                                                         seed=3))
    assert sampled == greedy
    assert free != greedy                                     # sampling really samples


def test_seeded_sampling_is_reproducible():
    model = tiny_model(seed=2)
    ids = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.2, max_new_tokens=16,
                         stop_strings=(), seed=11)
    assert generate_ids(model, ids, None, cfg) == generate_ids(model, ids, None, cfg)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_tiny_hf_neox(tmp_path_factory.mktemp("hf"), seed=3, max_position_embeddings=256)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf_generate(hf_folder, penalty):
    from transformers import GPTNeoXForCausalLM as HFModel

    from gptneox.load import load_model
    ours = load_model(hf_folder)
    ref = HFModel.from_pretrained(hf_folder).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 320, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                           # a left-padded batch
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 1)
    n = 20
    for rows in ([1], [0, 1, 2]):                             # a single prompt, then the padded batch
        cfg = SamplingConfig(do_sample=False, max_new_tokens=n, stop_strings=(), repetition_penalty=penalty,
                             no_repeat_ngram_size=0)                      # HF generate's default
        got = generate_ids(ours, ids[rows], mask[rows], cfg, eos_token_id=None)
        with torch.no_grad():
            hf = ref.generate(ids[rows], attention_mask=mask[rows], do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, repetition_penalty=penalty, pad_token_id=1, eos_token_id=None)
        expected = hf[:, ids.shape[1]:].tolist()
        if penalty != 1.0 and len(rows) > 1:
            # HF also penalises the pad id sitting in a padded row's input_ids; we do not (pads are not text),
            # so a padded row must equal HF on that row alone, unpadded.
            for k, r in enumerate(rows):
                if not mask[r].all():
                    real = ids[r:r + 1, mask[r].bool()]
                    with torch.no_grad():
                        alone = ref.generate(real, attention_mask=torch.ones_like(real), do_sample=False,
                                             max_new_tokens=n, min_new_tokens=n, repetition_penalty=penalty,
                                             pad_token_id=1, eos_token_id=None)
                    expected[k] = alone[0, real.shape[1]:].tolist()
        assert got == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linears_same_logits_and_tokens(dtype):
    from core.onednn import PackedLinear, pack_linears, packing_available
    model = tiny_model(seed=4).to(dtype)
    ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    tokens = generate_ids(model, ids, None, GREEDY)
    n = pack_linears(model)
    if not packing_available(dtype):             # no oneDNN, or bf16 on a CPU without native bf16 (AVX2):
        assert n == 0 and not any(isinstance(m, PackedLinear) for m in model.modules())  # a clean decline
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU/build (declined cleanly, model untouched)")
    assert n == 2 * 4 + 1                        # qkv, dense, h_to_4h, 4h_to_h per layer + embed_out
    assert isinstance(model.embed_out, PackedLinear) and model.dtype == dtype
    with torch.no_grad():
        after = model(ids)
    if dtype == torch.bfloat16:
        assert torch.equal(after, before)        # bitwise: the same oneDNN kernel, weight laid out once
    else:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert generate_ids(model, ids, None, GREEDY) == tokens


# ---------------------------------------------------------------------------------------------------------
# KV-cache prefix reuse across calls (python -m chat's turns)
# ---------------------------------------------------------------------------------------------------------

def _tiny_gemma(tmp_path):
    from gemma.load import load_model
    from tests.gemma_fixtures import save_tiny_hf_gemma
    return load_model(save_tiny_hf_gemma(tmp_path / "g", "gemma3", max_position_embeddings=256)).eval()


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_prefix_cache_reuse_equals_fresh_and_prefills_less(family, tmp_path):
    """Turns sharing a prefix with what the cache holds (previous prompt + answer) prefill only the rest, and
    the greedy answers equal a fresh cache's; a different prompt, a retry and another model are handled. The
    Gemma model's sliding window (6) is far shorter than the reused prefixes."""
    from infer.prefix_cache import PrefixCache
    from infer.sampler import generate_batch
    model = tiny_model() if family == "gpt_neox" else _tiny_gemma(tmp_path)
    vocab = model.config.vocab_size
    rand = lambda n, s: torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(s)).tolist()  # noqa
    cfg = SamplingConfig(do_sample=False, max_new_tokens=12, stop_strings=())
    pc = PrefixCache()

    def both(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt])
        fresh = generate_batch(model, ids, None, cfg).token_ids[0]
        reused = generate_batch(model, ids, None, cfg, prefix_cache=pc).token_ids[0]
        assert reused == fresh and len(fresh) == 12
        assert pc.reused + pc.prefilled == len(prompt) and pc.cache.length == len(prompt) + 11
        return fresh

    p1 = rand(9, 0)
    a1 = both(p1)
    assert (pc.reused, pc.prefilled) == (0, 9)
    p2 = p1 + a1 + rand(5, 1)                 # next turn = history + new message: only 1 + 5 tokens prefilled
    a2 = both(p2)
    assert (pc.reused, pc.prefilled) == (9 + 11, 6)
    p3 = p2[:4] + rand(7, 2)                  # shares 4 tokens (e.g. a memory item in front)
    both(p3)
    assert (pc.reused, pc.prefilled) == (4, 7)
    both(p3)                                  # the same prompt again (a retry): only its last token
    assert (pc.reused, pc.prefilled) == (10, 1)
    both(rand(6, 3)[:1] + p3)                 # nothing shared at the start
    assert pc.reused == 0
    other = tiny_model(seed=7) if family == "gpt_neox" else model
    if other is not model:                    # another model: a fresh cache, not the first model's keys
        ids = torch.tensor([p2])
        assert (generate_batch(other, ids, None, cfg, prefix_cache=pc).token_ids[0] ==
                generate_batch(other, ids, None, cfg).token_ids[0]) and pc.reused == 0
    assert a2 != a1


def test_prefix_cache_ignored_for_batches_and_padding():
    from infer.prefix_cache import PrefixCache
    from infer.sampler import generate_batch
    model, pc = tiny_model(), PrefixCache()
    ids = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    assert generate_batch(model, ids, mask, GREEDY, prefix_cache=pc).token_ids == generate_ids(model, ids, mask,
                                                                                              GREEDY)
    assert pc.cache is None


def test_banned_by_ngrams_by_hand():
    ids = [5, 6, 7, 5, 6]
    assert banned_by_ngrams(ids, 3) == [7]          # (5, 6) was followed by 7
    assert sorted(banned_by_ngrams(ids, 2)) == [7]  # (6,) was followed by 7
    assert banned_by_ngrams([5, 6, 5, 6, 5], 2) == [6, 6]
    assert sorted(banned_by_ngrams(ids, 1)) == [5, 6, 7] and banned_by_ngrams(ids, 0) == []
    assert banned_by_ngrams([1], 3) == []


def test_no_repeat_ngram_breaks_a_greedy_loop():
    """A tiny random model loops under greedy decoding; with no_repeat_ngram_size=3 no trigram of the answer
    repeats (the prompt's own trigrams may: the rule covers the answer only)."""
    model = tiny_model(seed=2)
    ids = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(1))

    def trigrams(row):
        return [tuple(row[i:i + 3]) for i in range(len(row) - 2)]

    loop = generate_ids(model, ids, None, SamplingConfig(do_sample=False, max_new_tokens=40, stop_strings=(),
                                                         no_repeat_ngram_size=0))
    fixed = generate_ids(model, ids, None, SamplingConfig(do_sample=False, max_new_tokens=40, stop_strings=(),
                                                          no_repeat_ngram_size=3))
    assert any(len(set(trigrams(r))) < len(trigrams(r)) for r in loop)      # the loop is there without the rule
    assert all(len(set(trigrams(r))) == len(trigrams(r)) == 38 for r in fixed)
