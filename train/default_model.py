"""The bundled default base model for `python -m train.sft` without `--model`.

No weights ship with the project and nothing is downloaded, so the default run builds its own base:

1. a byte-level BPE tokenizer (`tokenizers`, GPT-2 style pre-tokenizer as Polyglot's) trained on the bundled
   CSV's text, specials `<|endoftext|>` (id 0, EOS) and `<|pad|>` (id 1);
2. a tiny GPT-NeoX with Polyglot-Ko's architecture scaled down (parallel residual, partial rotary, untied
   output projection, gelu);
3. a short full-parameter "pre-training" (next token over every question and every *training* answer, each
   a separate document wrapped in its half of the prompt template — `{input} (답변 시작) ### 답변:` and
   ` {output} (답변 종료)` — so that the marker tokens have trained embedding rows; questions are never
   followed by their answers and validation answers are never seen, so the validation loss stays honest and
   the SFT has the pairing to learn) so that LoRA has a language model to adapt rather than noise.

   Why the halves of the template: an untied output row that pre-training never touched stays near its
   random init (small norm), and a LoRA on the frozen layers cannot raise such a token's logit enough — the
   end marker `(답변 종료)` then never comes out and generation never stops.

The folder (HF layout: config.json, model.safetensors, tokenizer.json, tokenizer_config.json) is cached: a
fingerprint of the data file and of `DefaultModelSpec` is stored in `ohlora_default.json`, and a folder whose
fingerprint matches is reused.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.sft import PromptTemplate, load_sft_csv
from core.atomic import atomic_write_dir

FINGERPRINT_FILE = "ohlora_default.json"
BASE_MODEL_TYPE = "gpt_neox"  # the tiny base's architecture (Polyglot-Ko's), built through the family registry
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


@dataclass
class DefaultModelSpec:
    vocab_size: int = 3000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    rotary_pct: float = 0.5
    max_position_embeddings: int = 512
    pretrain_epochs: int = 12
    pretrain_block: int = 128      # packed sequence length for pre-training
    pretrain_batch: int = 8
    pretrain_lr: float = 2e-3
    seed: int = 1234


def bundled_data_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "ohlora_sft.csv"


def _fingerprint(data_path: Path, spec: DefaultModelSpec) -> str:
    h = hashlib.sha256(Path(data_path).read_bytes())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(b"v1")
    return h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts` (+ the template markers, so they get compact ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    tok.save(str(folder / "tokenizer.json"))
    eos, pad = SPECIAL_TOKENS
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": eos, "pad_token": pad, "bos_token": eos, "unk_token": eos,
         "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": eos, "pad_token": pad, "bos_token": eos, "unk_token": eos}, indent=2), encoding="utf-8")


def _packed_blocks(docs: list[list[int]], block: int, seed: int) -> torch.Tensor:
    """Concatenate documents (each ends in EOS) in a shuffled order and cut into (N, block) rows."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in docs[i]]
    n = max(1, len(stream) // block)
    stream = (stream + stream)[: n * block]  # at least one full block even for a tiny file
    return torch.tensor(stream, dtype=torch.long).view(n, block)


class _NextTokenLoss(torch.nn.Module):
    """(B, T) token blocks → summed next-token loss over all positions (full-parameter pre-training)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits = self.model(input_ids[:, :-1])                         # (B, T-1, V)
        targets = input_ids[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        return loss, targets.numel()


def build_default_base(folder: str | Path, data_path: str | Path | None = None,
                       spec: DefaultModelSpec | None = None, progress: bool = True,
                       template: PromptTemplate | None = None) -> Path:
    """Build (or reuse, when its fingerprint matches) the tiny default base model in `folder`."""
    from core.registry import family_for_model_type
    from train.distributed import DistInfo
    from train.loop import LoopConfig, Trainer

    folder, spec = Path(folder), spec or DefaultModelSpec()
    data_path = Path(data_path) if data_path else bundled_data_path()
    fingerprint = _fingerprint(data_path, spec)
    meta = folder / FINGERPRINT_FILE
    if meta.is_file() and (folder / "config.json").is_file():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return folder
        except json.JSONDecodeError:
            pass
    template = template or PromptTemplate()
    data = load_sft_csv(data_path)
    # Tokenizer: every text in the file + the template's fixed parts (their ids then stay short).
    all_texts = [p.input_text for p in data.train + data.valid + data.prompts] + \
                [p.output_text for p in data.train + data.valid if p.output_text] + \
                [template.prompt("") + template.answer_text("")] * 20
    tok = train_tokenizer(all_texts, spec.vocab_size)
    eos_id = tok.token_to_id(SPECIAL_TOKENS[0])
    family = family_for_model_type(BASE_MODEL_TYPE)
    config = family.config_class.from_dict(dict(
        model_type=BASE_MODEL_TYPE, vocab_size=tok.get_vocab_size(), hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size, rotary_pct=spec.rotary_pct,
        max_position_embeddings=spec.max_position_embeddings, use_parallel_residual=True, tie_word_embeddings=False,
        hidden_act="gelu", bos_token_id=eos_id, eos_token_id=eos_id), source="the tiny default base")
    torch.manual_seed(spec.seed)
    model = family.model_class(config)
    # Documents: questions (all rows) and training answers — validation answers stay unseen.
    # Each question and each training answer is its own document, wrapped in its half of the template, so the
    # marker tokens get trained embedding rows; a question is never followed by its answer here — pairing
    # them is what the LoRA SFT learns.
    docs_text = [template.prompt(p.input_text) for p in data.train + data.valid + data.prompts] + \
                [template.answer_text(p.output_text) for p in data.train]
    docs = [tok.encode(t).ids + [eos_id] for t in docs_text]
    blocks = _packed_blocks(docs, spec.pretrain_block + 1, spec.seed)  # +1: inputs and shifted targets
    n_batches = math.ceil(len(blocks) / spec.pretrain_batch)

    def batches_for_epoch(epoch: int) -> list[list[int]]:
        order = list(range(len(blocks)))
        random.Random(f"pretrain/{spec.seed}/{epoch}").shuffle(order)
        return [order[i * spec.pretrain_batch:(i + 1) * spec.pretrain_batch] for i in range(n_batches)]

    loop = LoopConfig(epochs=spec.pretrain_epochs, lr=spec.pretrain_lr, weight_decay=0.01, warmup_ratio=0.1,
                      lr_schedule="cosine", max_grad_norm=1.0, seed=spec.seed, progress=progress,
                      eval_every_epoch=False, desc="pre-train tiny base")
    # info=DistInfo(): one process builds the base (rank 0 under torchrun), on all the data, never sharded
    Trainer(_NextTokenLoss(model), loop, batches_for_epoch, info=DistInfo(),
            collate_fn=lambda idx: {"input_ids": blocks[idx]},
            tokens_in_batch=lambda b: int(b["input_ids"].numel())).fit()

    def write(tmp: Path) -> None:
        family.save_hf(model.eval(), tmp)
        save_tokenizer(tok, tmp)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(
            {"fingerprint": fingerprint, "data": str(data_path), "spec": asdict(spec),
             "note": "tiny GPT-NeoX built and pre-trained by train.default_model for the default SFT demo"},
            ensure_ascii=False, indent=2), encoding="utf-8")
    atomic_write_dir(folder, write)
    return folder
