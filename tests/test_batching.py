"""infer.batching: continuous batching. Requests that join and leave a running batch get the answer they get alone
(greedy: the same tokens; seeded sampling: the same draws), each with its own settings and stop strings; cancelled
rows leave at once; the cache keeps only columns some row still needs."""
from __future__ import annotations

import pytest
import torch

from infer.batching import BatchRequest, ContinuousBatcher
from infer.sampler import SamplingConfig, generate_batch, generate_detailed
from tests.serve_fixtures import STOP, EchoLM, echo_tokenizer
from tests.test_sampler import _tiny_gemma, tiny_model


class IdTokenizer:
    """Token ids as text ("5 17 42"): stop strings off, no EOS; enough for id-level comparisons."""
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def run(batcher: ContinuousBatcher, arrivals: dict[int, list[BatchRequest]], max_steps: int = 500):
    """Step the batcher, adding requests at the steps given; returns the requests in the order they finished."""
    done, step = [], 0
    while step < max_steps and (batcher.busy or any(s >= step for s in arrivals)):
        for request in arrivals.get(step, []):
            batcher.add(request)
        done += batcher.step()
        step += 1
    return done


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_greedy_in_a_batch_equals_alone(family, tmp_path):
    """Six prompts of different lengths join a batch of 4 at different steps (some wait for a free row) and
    leave at different lengths; each gets exactly its solo greedy tokens. The tiny Gemma's sliding window (6)
    is shorter than every answer, so the window is crossed inside padded, merged and trimmed caches."""
    model = tiny_model() if family == "gpt_neox" else _tiny_gemma(tmp_path)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 11, 5, 8, 4, 9)]
    configs = [SamplingConfig(do_sample=False, max_new_tokens=n, no_repeat_ngram_size=0, stop_strings=())
               for n in (14, 6, 9, 12, 5, 10)]
    requests = [BatchRequest(p, c) for p, c in zip(prompts, configs)]
    batcher = ContinuousBatcher(model, IdTokenizer(), max_batch=4)
    done = run(batcher, {0: requests[:2], 2: requests[2:4], 3: requests[4:5], 6: requests[5:]})
    assert sorted(r.id for r in done) == sorted(r.id for r in requests)
    for request, prompt, config in zip(requests, prompts, configs):
        alone = generate_batch(model, torch.tensor([prompt]), None, config).token_ids[0]
        assert request.token_ids == alone and request.finish_reason == "length"
    assert batcher.cache is None and batcher.rows == []           # everyone left: nothing held


def test_per_request_settings_seeds_and_penalties():
    """A greedy row, two seeded sampling rows (one with top-k/top-p, one with a repetition penalty) and an n-gram
    banned row share the batch: each equals its own solo run."""
    model = tiny_model()
    tok = IdTokenizer()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (6, 4, 9, 5)]
    configs = [SamplingConfig(do_sample=False, max_new_tokens=12, no_repeat_ngram_size=0, stop_strings=()),
               SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=11, max_new_tokens=12, stop_strings=()),
               SamplingConfig(temperature=1.2, repetition_penalty=1.3, seed=5, max_new_tokens=10, stop_strings=()),
               SamplingConfig(do_sample=False, no_repeat_ngram_size=2, max_new_tokens=16, stop_strings=())]
    requests = [BatchRequest(p, c) for p, c in zip(prompts, configs)]
    run(ContinuousBatcher(model, tok, max_batch=8), {0: requests[:2], 1: requests[2:]})
    for request, prompt, config in zip(requests, prompts, configs):
        alone = generate_batch(model, torch.tensor([prompt]), None, config, decode=tok.decode).token_ids[0]
        assert request.token_ids == alone


def test_echo_rows_keep_their_own_text_stops_and_stream(tmp_path):
    """EchoLM reads each row's history from the cache, so any mix-up of rows, padding or trimming shows as a
    wrong answer. Bytewise tokens split every syllable; each row has its own stop strings and stream."""
    tok = echo_tokenizer(tmp_path / "tok")
    model = EchoLM(tok, bytewise=True)
    messages = ["안녕", "오늘은 친구랑 카페 가기로 했어", "비 오는 날에는 집에서 영화 보는 게 최고야", "좋아",
                "나는 떡볶이를 정말 좋아해", "[기분: 최고] 날씨 좋다"]
    stops = [(), ("카페",), ("영화",), (), ("정말",), ()]
    from data.sft import PromptTemplate
    template = PromptTemplate()
    pieces: dict[int, list[str]] = {i: [] for i in range(len(messages))}
    requests = [BatchRequest(tok.encode(template.prompt(m)),
                             SamplingConfig(no_repeat_ngram_size=0, max_new_tokens=300, stop_strings=(STOP, *s)),
                             on_piece=pieces[i].append)
                for i, (m, s) in enumerate(zip(messages, stops))]
    batcher = ContinuousBatcher(model, tok, max_batch=3)
    run(batcher, {0: requests[:1], 1: requests[1:3], 4: requests[3:4], 20: requests[4:]})
    expected = ["안녕", "오늘은 친구랑", "비 오는 날에는 집에서", "좋아", "나는 떡볶이를", "[기분: 최고] 날씨 좋다"]
    assert [r.text for r in requests] == expected
    assert [r.finish_reason for r in requests] == ["stop"] * 6
    for i, r in enumerate(requests):
        assert "".join(pieces[i]) == r.text and all("\ufffd" not in p for p in pieces[i])
        alone = generate_detailed(model, tok, [template.prompt(messages[i])], r.config)
        assert (r.text, r.token_ids) == (alone.texts[0], alone.token_ids[0])


def test_cancelled_rows_leave_and_the_cache_shrinks(tmp_path):
    tok = echo_tokenizer(tmp_path / "tok")
    model = EchoLM(tok, bytewise=True)
    from data.sft import PromptTemplate
    long_prompt = tok.encode(PromptTemplate().prompt("가나다라 " * 20))
    short_prompt = tok.encode(PromptTemplate().prompt("안녕"))
    config = SamplingConfig(no_repeat_ngram_size=0, max_new_tokens=400)
    stop_flag = {"long": False}
    long = BatchRequest(long_prompt, config, cancelled=lambda: stop_flag["long"])
    short = BatchRequest(short_prompt, config)
    batcher = ContinuousBatcher(model, tok, max_batch=2)
    batcher.add(long)
    batcher.add(short)
    for _ in range(3):
        batcher.step()
    assert batcher.cache.length == len(long_prompt) + 3            # the short row is left-padded to it
    stop_flag["long"] = True
    finished = batcher.step()
    assert finished == [long] and long.finish_reason == "cancelled"
    assert len(batcher.rows) == 1
    assert batcher.cache.length == len(short_prompt) + 4           # the long row's columns are gone
    assert batcher.mask.all()
    done = run(batcher, {})
    assert done == [short] and short.text == "안녕"


def test_empty_sampled_answers_are_retried(tmp_path):
    """A sampled answer that comes out empty goes back to the queue (as `generate` retries it); greedy once."""
    tok = echo_tokenizer(tmp_path / "tok")
    model = EchoLM(tok)
    from data.sft import PromptTemplate
    prompt = tok.encode(PromptTemplate().prompt("안녕"))
    request = BatchRequest(prompt, SamplingConfig(max_new_tokens=20, stop_strings=(STOP, "안녕"), max_trials=3,
                                                  seed=0, no_repeat_ngram_size=0))
    done = run(ContinuousBatcher(model, tok), {0: [request]})
    assert done == [request] and request.text == "" and request.trials == 3
    greedy = BatchRequest(prompt, SamplingConfig(do_sample=False, max_new_tokens=20, stop_strings=("안녕",)))
    run(ContinuousBatcher(model, tok), {0: [greedy]})
    assert greedy.trials == 1
