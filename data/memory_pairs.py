"""Training / test pairs for the S-BERT memory, built from a "combination" file.

Each non-blank line of a combination file holds a memory item in brackets, a space, then a user message:

    [오늘 일정: 친구랑 카페 방문] 아 오늘 뭐 입고 나가지

N lines give every (memory of line i, message of line j) pair, N×N rows with the columns
`memory_0, user_prompt_1, similarity_score`. The target score compares the two memory *keys* only:

    score(i, j) = 1.0                        if key_i == key_j
                = |W_i ∩ W_j| / |W_i ∪ W_j|   otherwise (IoU of the space-separated words), rounded to 4 decimals

where keys of one synonym group count as the same key before scoring. `--aliases extended` (the default,
`EXTENDED_ALIASES`) holds the documented groups below (docs/data.md); `--aliases original` is the original
Oh-LoRA rule, only `좋아하는 아이돌` ≡ `좋아하는 가수`, with which the original's CSVs reproduce exactly. The bundled
training combinations use synonym keys (`최애 가수`, `좋아하는 메뉴`, `애완동물`, `지금 기분`, ...), so their CSV is the
extended rule's; the test combinations use only the original pair, so both rules give the same test CSV.

    python -m data.memory_pairs data/memory_train_combs.txt runs/memory_train.csv [--aliases original]
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.atomic import atomic_write_file
from core.cli import Parser, add_config_flags, config_from_args, flag, run_cli
from core.errors import OhLoRAError
from core.jsonio import read_text

COLUMNS = ("memory_0", "user_prompt_1", "similarity_score")
# Keys that name the same topic; each key of a group is scored as the group's first (canonical) key.
ORIGINAL_ALIASES = {"좋아하는 아이돌": "좋아하는 가수"}  # the original Oh-LoRA rule
# Groups a user would call "the same question" (what a memory under one key answers, the other asks for).
# Only exact paraphrases of one fact: 오늘 일정 vs 내일 일정, or 좋아하는 vs 싫어하는, stay different keys.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("좋아하는 가수", "좋아하는 아이돌", "최애 가수", "최애 아이돌"),
    ("좋아하는 음식", "최애 음식", "좋아하는 메뉴"),
    ("싫어하는 음식", "못 먹는 음식"),
    ("반려동물", "애완동물", "키우는 동물"),
    ("사는 곳", "사는 동네", "거주지"),
    ("취미", "여가 활동"),
    ("직업", "하는 일"),
    ("최근 고민", "요즘 고민"),
    ("오늘 기분", "지금 기분"),
    ("주말 계획", "주말 일정"),
)
EXTENDED_ALIASES = {key: group[0] for group in SYNONYM_GROUPS for key in group[1:]}
ALIAS_RULES = {"extended": EXTENDED_ALIASES, "original": ORIGINAL_ALIASES}
KEY_ALIASES = EXTENDED_ALIASES  # the default rule

# `[key: value] message` — key without ':' or brackets, a non-empty value, whitespace, a non-empty message.
_LINE = re.compile(r"^\[(?P<key>[^:\[\]]+):(?P<value>[^\[\]]+)\]\s+(?P<message>\S.*)$")


class CombinationFileError(OhLoRAError):
    """A combination file that cannot be read or parsed; the message names the file (and line)."""


@dataclass(frozen=True)
class MemoryLine:
    memory: str    # the bracketed item as written, e.g. "[오늘 일정: 친구랑 카페 방문]"
    key: str       # "오늘 일정"
    value: str     # "친구랑 카페 방문"
    message: str   # "아 오늘 뭐 입고 나가지"
    line_no: int   # 1-based line number in its file


def normalise_key(key: str, aliases: dict[str, str] | None = None) -> str:
    """Collapse whitespace and map aliases (`좋아하는 아이돌` → `좋아하는 가수`); default: KEY_ALIASES."""
    key = " ".join(key.split())
    aliases = KEY_ALIASES if aliases is None else aliases
    return aliases.get(key, key)


def key_similarity(key_a: str, key_b: str, aliases: dict[str, str] | None = None) -> float:
    """1.0 for the same (normalised) key, else the IoU of the keys' word sets, rounded to 4 decimals."""
    a, b = normalise_key(key_a, aliases), normalise_key(key_b, aliases)
    if a == b:
        return 1.0
    words_a, words_b = set(a.split(" ")), set(b.split(" "))
    return round(len(words_a & words_b) / len(words_a | words_b), 4)


def parse_line(text: str, source: str = "<string>", line_no: int = 1) -> MemoryLine:
    """Parse one `[key: value] message` line; raise CombinationFileError naming `source:line_no`."""
    match = _LINE.match(text.strip())
    if match is None:
        raise CombinationFileError(
            f"{source}:{line_no}: expected '[key: value] message', got {text.strip()[:60]!r}")
    key, value = " ".join(match["key"].split()), match["value"].strip()
    if not key or not value:
        raise CombinationFileError(f"{source}:{line_no}: empty memory key or value in {text.strip()[:60]!r}")
    memory = text.strip()[: match.end("value") + 1]
    return MemoryLine(memory=memory, key=key, value=value, message=match["message"].strip(), line_no=line_no)


def read_combinations(path: str | os.PathLike) -> list[MemoryLine]:
    """All lines of a combination file (UTF-8, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such combination file")
    text = read_text(path, CombinationFileError, bom=True)
    lines = [parse_line(line, str(path), i) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise CombinationFileError(f"{path}: no combination lines")
    return lines


def build_pairs(lines: list[MemoryLine], aliases: dict[str, str] | None = None) -> pd.DataFrame:
    """N lines → N×N rows (memory of line i, message of line j, key score), i-major order."""
    rows = [(a.memory, b.message, key_similarity(a.key, b.key, aliases)) for a in lines for b in lines]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `df` as UTF-8 CSV via a temp file + os.replace (never a half-written CSV)."""
    return atomic_write_file(path, lambda tmp: df.to_csv(tmp, index=False, encoding="utf-8"))


def generate(combs_path: str | os.PathLike, out_csv: str | os.PathLike, aliases: str = "extended") -> pd.DataFrame:
    """Pairs of `combs_path` written to `out_csv`; `aliases` names the key rule (ALIAS_RULES)."""
    df = build_pairs(read_combinations(combs_path), ALIAS_RULES[aliases])
    write_csv_atomic(df, out_csv)
    return df


@dataclass
class PairsOptions:
    """`python -m data.memory_pairs` arguments (core.cli)."""
    combs: str = flag(None, positional=True, kind="file",
                      help="combination file: one '[key: value] message' per line")
    out_csv: str = flag(None, positional=True, kind="output_file",
                        help="output CSV (memory_0, user_prompt_1, similarity_score), written atomically")
    aliases: str = flag("extended", choices=tuple(ALIAS_RULES),
                        help="key synonym rule: extended (documented groups) or original (idol = singer only)")


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m data.memory_pairs", description=__doc__.split("\n\n")[0])
    add_config_flags(parser, PairsOptions, argparse_metavars=True)
    args = config_from_args(PairsOptions, parser.parse_args(argv))
    df = generate(args.combs, args.out_csv, args.aliases)
    n = int(round(len(df) ** 0.5))
    exact = int((df["similarity_score"] == 1.0).sum())
    print(f"{args.out_csv}: {len(df)} pairs from {n} lines ({exact} with score 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
