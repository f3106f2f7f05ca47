"""train/quality.py: the metric functions on hand-made answers, and `measure` on a scripted model."""
from __future__ import annotations

import pytest

from data.sft import QAPair
from train import quality
from train.quality import QualityReport, hangul_share, memory_value, uses_value
from infer.sampler import GenerationOutput


def test_hangul_share_counts_letters_only():
    assert hangul_share(["안녕! 123 ..."]) == 1.0                   # digits and punctuation are not letters
    assert hangul_share(["안녕 ok"]) == pytest.approx(2 / 4)
    assert hangul_share(["", "   "]) == 1.0                         # no letters: nothing to hold against it
    assert hangul_share(["ㅋㅋ hi"]) == pytest.approx(2 / 4)          # compatibility jamo count as Hangul


def test_memory_value_and_its_use():
    assert memory_value("[오늘 일정: 친구 생일 파티] 오늘 뭐 입지?") == "친구 생일 파티"
    assert memory_value("오늘 뭐 입지?") is None
    assert uses_value("친구 생일 파티", "생일 축하 파티 가자!")
    assert uses_value("우울함", "오늘 좀 우울하다고 했지?")            # 3+ letters: the stem without its ending
    assert not uses_value("비", "맑은 날이야")
    assert uses_value("비", "비 오니까 집에 있자")
    assert not uses_value("캠핑", "집에서 쉬자")


def test_report_checks_and_loss_drop():
    r = QualityReport(n=10, stop_share=0.9, empty=0, hangul_share=0.85, memory_use=0.4, n_memory=5,
                      eval_loss=2.0, base_eval_loss=4.0)
    assert r.loss_drop == pytest.approx(0.5)
    assert r.checks() == {"stop_share": True, "empty": True, "hangul_share": True, "loss_drop": True,
                          "memory_use": False}
    assert QualityReport(n=1, stop_share=0.5, empty=1, hangul_share=0.1, memory_use=None, n_memory=0).checks() == \
        {"stop_share": False, "empty": False, "hangul_share": False, "loss_drop": None, "memory_use": None}
    table = r.table(before=QualityReport(n=10, stop_share=0.0, empty=2, hangul_share=0.5, memory_use=0.0,
                                         n_memory=5, eval_loss=4.0, base_eval_loss=4.0))
    assert "| 0.0 % | 90.0 %" in table and "| 0.0 % | 50.0 %" in table     # loss drop: before 0, after 50


def test_measure_scores_what_the_sampler_returned(monkeypatch):
    pairs = [QAPair("[좋아하는 음식: 치킨] 저녁 뭐 먹지?", "치킨!", "valid"), QAPair("안녕", "안녕!", "valid"),
             QAPair("[취미: 러닝] 주말에 뭐 하지?", "러닝!", "valid"), QAPair("뭐 해?", "쉬어", "valid")]
    answers = ["치킨 먹자!", "hello there", "영화 보자", ""]
    reasons = ["stop", "stop", "length", "eos"]
    seen = {}

    def fake(model, tokenizer, prompts, config):
        seen["prompts"] = prompts
        return GenerationOutput(token_ids=[[1]] * 4, texts=answers, finish_reasons=reasons)

    monkeypatch.setattr(quality, "generate_detailed", fake)
    r = quality.measure(None, None, pairs, eval_loss=1.0, base_eval_loss=2.0)
    assert seen["prompts"][1] == "안녕 (답변 시작) ### 답변:"
    assert (r.n, r.stop_share, r.empty, r.n_memory, r.memory_use) == (4, 0.5, 1, 2, 0.5)
    assert r.hangul_share == pytest.approx(8 / 18)     # 치킨먹자 + 영화보자 = 8 Hangul, hellothere = 10 Latin
    assert r.loss_drop == pytest.approx(0.5)


def test_report_sampling_is_chats_with_bounded_trials():
    cfg, chat = quality.quality_sampling(seed=7), quality.SamplingConfig()
    assert (cfg.seed, cfg.max_trials, cfg.max_new_tokens) == (7, quality.QUALITY_TRIALS, chat.max_new_tokens)
    assert (cfg.temperature, cfg.top_p, cfg.stop_strings) == (chat.temperature, chat.top_p, ("(답변 종료)",))
