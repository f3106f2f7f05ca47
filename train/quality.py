"""How good are the answers? The figures the default `python -m train.sft` run must reach, on the bundled
validation prompts. `python -m train.sft` prints them at the end of its run; by hand:

    python -m train.quality --adapter runs/sft/best            # the adapter on the base it names
    python -m train.quality --adapter runs/sft/best --compare  # ... and the untrained base beside it
    python -m train.quality                                    # the untrained base alone (default: Gemma-3 270M)

    stop share     answers that end with the stop string `(답변 종료)` before the token limit      target ≥ 90 %
    empty          answers still empty after the sampler's retries                                 target 0
    Hangul share   Hangul letters among all letters of the answers (str.isalpha)                   target ≥ 80 %
    loss drop      1 - eval loss / the untrained base's eval loss                                  target ≥ 30 %
    memory use     of the questions that carry a `[key: value]` item, the answers that use the value  aim ≥ 50 %

"Uses the value": some word of the value appears in the answer, a word of 3+ letters also without its last
letter — Korean inflects at the end of a word (`우울함` → `우울하다`, `캠핑` stays `캠핑`).

Answers are sampled as `python -m chat` samples them (SamplingConfig's defaults, a fixed seed), so the figures
describe what a user sees — except that an empty answer is tried at most QUALITY_TRIALS times in all (chat: 30):
that bounds the report's time (an untrained base answers empty often) and is the stricter test.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.cli import DTYPE_CHOICES, Parser, check_file, choose_dtype, number, run_cli
from core.errors import OhLoRAError
from core.jsonio import read_json
from core.registry import bundled_weights
from data.memory_items import extract_memory_items, strip_memory_items
from data.sft import PromptTemplate, QAPair, collate, encode_pairs, length_bucketed_batches, load_sft_csv
from infer.models import check_model_path, load_causal_lm
from infer.sampler import SamplingConfig, generate_detailed
from train.loss import CausalLMLoss

QUALITY_TRIALS = 5


def quality_sampling(seed: int = 0, max_new_tokens: int = SamplingConfig.max_new_tokens) -> SamplingConfig:
    """The report's sampling: chat's defaults, a fixed seed, QUALITY_TRIALS trials per answer."""
    return SamplingConfig(seed=seed, max_new_tokens=max_new_tokens, max_trials=QUALITY_TRIALS)


TARGETS = {"stop_share": 0.90, "empty": 0, "hangul_share": 0.80, "loss_drop": 0.30, "memory_use": 0.50}


def is_hangul(ch: str) -> bool:
    o = ord(ch)
    return 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F


def hangul_share(texts: list[str]) -> float:
    """Hangul letters / all letters over `texts` (1.0 when there are no letters at all)."""
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(map(is_hangul, letters)) / len(letters) if letters else 1.0


def uses_value(value: str, answer: str) -> bool:
    """Does `answer` use the memory value (see the module doc for the rule)?"""
    for word in value.split():
        stems = {word, word[:-1]} if len(word) >= 3 else {word}
        if any(s and s in answer for s in stems):
            return True
    return False


def memory_value(question: str) -> str | None:
    """The value of the question's first `[key: value]` item, or None."""
    items = extract_memory_items(question)
    return items[0].strip("[]").split(":", 1)[1].strip() if items else None


@dataclass
class QualityReport:
    n: int
    stop_share: float
    empty: int
    hangul_share: float
    memory_use: float | None          # None: no question carries an item
    n_memory: int
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)

    @property
    def loss_drop(self) -> float | None:
        if self.eval_loss is None or not self.base_eval_loss:
            return None
        return 1.0 - self.eval_loss / self.base_eval_loss

    def checks(self) -> dict[str, bool | None]:
        """Each target met (None: not measured)."""
        drop = self.loss_drop
        return {"stop_share": self.stop_share >= TARGETS["stop_share"], "empty": self.empty <= TARGETS["empty"],
                "hangul_share": self.hangul_share >= TARGETS["hangul_share"],
                "loss_drop": None if drop is None else drop >= TARGETS["loss_drop"],
                "memory_use": None if self.memory_use is None else self.memory_use >= TARGETS["memory_use"]}

    def table(self, before: "QualityReport | None" = None) -> str:
        """A plain-text table (a `before` column too when given)."""
        def pct(x):
            return "—" if x is None else f"{100 * x:.1f} %"

        rows = [("answers ending with (답변 종료)", "≥ 90 %", lambda r: pct(r.stop_share)),
                ("empty answers", "0", lambda r: str(r.empty)),
                ("Hangul share of letters", "≥ 80 %", lambda r: pct(r.hangul_share)),
                ("eval loss", "", lambda r: "—" if r.eval_loss is None else f"{r.eval_loss:.4f}"),
                ("eval loss below the base's", "≥ 30 %", lambda r: pct(r.loss_drop)),
                (f"memory value used ({self.n_memory} questions)", "aim ≥ 50 %", lambda r: pct(r.memory_use))]
        head = ["", "target"] + (["before"] if before else []) + ["after" if before else "measured"]
        lines = [" | ".join(head), " | ".join("---" for _ in head)]
        for name, target, cell in rows:
            lines.append(" | ".join([name, target] + ([cell(before)] if before else []) + [cell(self)]))
        return "\n".join(lines)


def measure(model, tokenizer, pairs: list[QAPair], template: PromptTemplate | None = None,
            config: SamplingConfig | None = None, eval_loss: float | None = None,
            base_eval_loss: float | None = None) -> QualityReport:
    """Generate an answer to every pair's question and score them (see the module doc)."""
    template = template or PromptTemplate()
    config = config or quality_sampling()
    questions = [p.input_text for p in pairs]
    out = generate_detailed(model, tokenizer, [template.prompt(q) for q in questions], config)
    answers, reasons = out.texts, out.finish_reasons
    values = [memory_value(q) for q in questions]
    used = [uses_value(v, a) for v, a in zip(values, answers) if v is not None]
    return QualityReport(n=len(answers), stop_share=sum(r == "stop" for r in reasons) / max(len(reasons), 1),
                         empty=sum(not a for a in answers), hangul_share=hangul_share(answers),
                         memory_use=sum(used) / len(used) if used else None, n_memory=len(used),
                         eval_loss=eval_loss, base_eval_loss=base_eval_loss, samples=list(zip(questions, answers)))


def with_and_without_memory(model, tokenizer, pairs: list[QAPair], n: int = 5,
                            template: PromptTemplate | None = None,
                            config: SamplingConfig | None = None) -> list[tuple[str, str, str, str]]:
    """(question with item, its answer, question without it, that answer) for the first `n` item questions."""
    template = template or PromptTemplate()
    config = config or quality_sampling()
    withs = [p.input_text for p in pairs if memory_value(p.input_text) is not None][:n]
    withouts = [strip_memory_items(q) for q in withs]
    answers = generate_detailed(model, tokenizer, [template.prompt(q) for q in withs + withouts], config).texts
    return list(zip(withs, answers[:len(withs)], withouts, answers[len(withs):]))


def print_report(report: QualityReport, memory_samples: list[tuple[str, str, str, str]] = (),
                 before: QualityReport | None = None, n_samples: int = 5, file=sys.stdout) -> None:
    print(f"Quality on {report.n} validation prompts (train.quality):", file=file)
    print(report.table(before), file=file)
    missed = [k for k, ok in report.checks().items() if ok is False]
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}", file=file)
    plain = [(q, a) for q, a in report.samples if memory_value(q) is None][:n_samples]
    if plain:
        print("Sample answers:", file=file)
        for q, a in plain:
            print(f"  Q: {q}\n  A: {a}", file=file)
    if memory_samples:
        print("With and without a memory item in front:", file=file)
        for qm, am, q, a in memory_samples:
            print(f"  Q: {qm}\n  A: {am}\n  Q: {q}\n  A: {a}", file=file)


# ----------------------------------------------------------------------------------------------------- CLI
@torch.no_grad()
def eval_loss(model, tokenizer, pairs: list[QAPair], template: PromptTemplate | None = None,
              max_length: int = 128, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token over `pairs` (train.sft's loss and its eval, one process)."""
    template = template or PromptTemplate()
    examples = encode_pairs(tokenizer, template, pairs, max_length).examples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_fn, total, n = CausalLMLoss(model), 0.0, 0
    was_training = model.training
    model.eval()
    for idx in length_bucketed_batches([len(e) for e in examples], batch_size, 0, 0, shuffle=False):
        b = collate([examples[i] for i in idx], pad)
        loss_sum, k = loss_fn(b["input_ids"], b["labels"])
        total, n = total + float(loss_sum), n + k
    model.train(was_training)
    return total / max(n, 1)


class QualityError(OhLoRAError):
    """The adapter folder names no base model that is here."""


def base_of(adapter: Path) -> str:
    """The base model an adapter was trained on, as train.sft records it (base_model_name_or_path)."""
    named = read_json(adapter / "adapter_config.json", QualityError).get("base_model_name_or_path")
    if not named or not Path(named).exists():
        raise QualityError(f"{adapter / 'adapter_config.json'}: base_model_name_or_path {named!r} is not here; "
                           "pass --model PATH")
    return named


def build_parser() -> Parser:
    p = Parser(prog="python -m train.quality", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--adapter", type=Path, help="a LoRA adapter folder (train.sft's OUT/best or OUT/last); default: none, "
                                   "the untrained base")
    a("--model", type=check_model_path, help="base model (HF folder or .gguf); default: the one the adapter "
                                             "names, else the real Gemma-3 270M")
    a("--compare", action="store_true", help="also measure the untrained base: a before / after table")
    a("--data", type=check_file, help="Q&A CSV with a validation split (default: the bundled data)")
    a("--max-length", type=number(int, "[2, inf)"), default=128, help="tokens per example for the eval loss")
    a("--max-new-tokens", type=number(int, "[1, inf)"), default=SamplingConfig.max_new_tokens)
    a("--seed", type=int, default=42, help="sampling seed (train.sft's default)")
    a("--samples", type=number(int, "[0, inf)"), default=5, help="sample answers printed (each kind)")
    a("--dtype", choices=DTYPE_CHOICES, default="auto", help="base weight dtype (auto: bf16 where native)")
    return p


def main_run(argv: list[str] | None = None) -> tuple[QualityReport, QualityReport | None]:
    args = build_parser().parse_args(argv)
    from lora import load_adapter
    from train.default_model import bundled_data_path

    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        raise QualityError(f"{args.adapter}: no adapter_config.json (not a LoRA adapter folder)")
    model_path = args.model or (base_of(args.adapter) if args.adapter is not None else None)
    if model_path is None:
        found, _, reason = bundled_weights()
        if found is None:
            raise QualityError(f"no --model and no real base: {reason}")
        model_path = str(found)
    data_path = Path(args.data) if args.data else bundled_data_path()
    valid = load_sft_csv(data_path).valid
    if not valid:
        raise QualityError(f"{data_path}: no validation rows with an answer")
    dtype_name, note = choose_dtype(args.dtype, "cpu")
    if note:
        print(note, file=sys.stderr)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.time()
    model, tokenizer = load_causal_lm(model_path, dtype)
    config = quality_sampling(args.seed, args.max_new_tokens)
    before = None
    if args.adapter is None or args.compare:
        base_loss = eval_loss(model, tokenizer, valid, max_length=args.max_length)
        before = measure(model, tokenizer, valid, config=config, eval_loss=base_loss, base_eval_loss=base_loss)
    if args.adapter is None:
        print(f"model {model_path} (untrained) | {time.time() - t0:.0f} s")
        print_report(before, with_and_without_memory(model, tokenizer, valid, args.samples, config=config),
                     n_samples=args.samples)
        return before, None
    load_adapter(model, args.adapter)
    base_loss = before.eval_loss if before is not None else None
    after = measure(model, tokenizer, valid, config=config,
                    eval_loss=eval_loss(model, tokenizer, valid, max_length=args.max_length),
                    base_eval_loss=base_loss)
    print(f"model {model_path} + adapter {args.adapter} | {time.time() - t0:.0f} s")
    print_report(after, with_and_without_memory(model, tokenizer, valid, args.samples, config=config),
                 before=before, n_samples=args.samples)
    return after, before


@run_cli
def main(argv: list[str] | None = None) -> int:
    main_run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
