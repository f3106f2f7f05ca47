"""`SentenceEncoder`: BERT/RoBERTa encoder + mean pooling (+ L2 normalise), in the sentence-transformers folder format.

    u = normalize( sum_t mask_t · h_t / max(sum_t mask_t, 1e-9) )     h = encoder(tokens) (B, T, H) -> u (B, H)

Folders read by `SentenceEncoder.load`:
  * legacy sentence-transformers (MiniLM, the original Oh-LoRA model): modules.json with types
    `sentence_transformers.models.Transformer/Pooling/Normalize`, `1_Pooling/config.json` with
    `pooling_mode_mean_tokens: true`, `sentence_bert_config.json` with `max_seq_length` and `do_lower_case`;
  * sentence-transformers 6.x: types `sentence_transformers.base.modules.transformer.Transformer`,
    `sentence_transformers.sentence_transformer.modules.pooling.Pooling`,
    `sentence_transformers.base.modules.normalize.Normalize`, `pooling_mode: "mean"`, the max length as
    `model_max_length` in tokenizer_config.json (capped at the model's positions, as ST does);
  * a plain HF BERT/RoBERTa folder (no modules.json): mean pooling, no normalisation.
Only mean pooling is implemented; another pooling mode or module type is a clear error naming the file.

`save` writes the legacy dialect (which sentence-transformers 2.x … 6.x all load) plus `model_max_length` in
tokenizer_config.json, so both dialects' readers find the same max length.

Prompts (e5's `query: ` / `passage: `) live where sentence-transformers keeps them, `prompts` in
config_sentence_transformers.json, so a trained model keeps its base's and ST applies the same ones
(`encode(texts, prompt_name="query")`). The memory roles: the user's message is the query, a stored
`[key: value]` item the passage (`encode_query` / `encode_passage`; no prompt stored = no prefix, as MiniLM).
The memory's calibrated threshold is `threshold` in ohlora_memory.json (`memory_config`), written by sbert.train.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bert.encoder import BertEncoder, EncoderLoadError, load_encoder, save_encoder_weights
from bert.tokenizer import SentenceTokenizer
from core.atomic import atomic_write_dir
from core.jsonio import read_json

MODULE_KINDS = ("Transformer", "Pooling", "Normalize")
LEGACY_TYPES = {k: f"sentence_transformers.models.{k}" for k in MODULE_KINDS}
POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
VERY_LARGE_LENGTH = 10 ** 9  # HF writes model_max_length = 1e30 when a tokenizer has no limit
ST_CONFIG = "config_sentence_transformers.json"
MEMORY_CONFIG = "ohlora_memory.json"  # {"threshold": cos, "calibration": {...}}: the memory's settings
QUERY, PASSAGE = "query", "passage"    # prompt names: the user's message / a stored memory item


class SentenceModelError(EncoderLoadError):
    """A sentence-transformers folder we cannot read: the message names the file and the problem."""


def _read_json(path: Path) -> Any:
    try:
        return read_json(path, SentenceModelError, expect=None)
    except FileNotFoundError:
        raise SentenceModelError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SentenceModelError(f"{path}: is a folder, expected a JSON file") from None


def _module_kind(type_name: str, source: Path) -> str:
    """'sentence_transformers.models.Pooling' / '…modules.pooling.Pooling' -> 'Pooling'."""
    kind = type_name.rsplit(".", 1)[-1]
    if not type_name.startswith("sentence_transformers.") or kind not in MODULE_KINDS:
        raise SentenceModelError(f"{source}: module type {type_name!r} is not supported "
                                 f"(only Transformer, mean Pooling and Normalize)")
    return kind


def _check_mean_pooling(path: Path) -> None:
    config = _read_json(path)
    if "pooling_mode" in config:  # sentence-transformers 6.x
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:  # legacy boolean flags
        modes = [k for k in POOLING_FLAGS if config.get(k)]
        modes = ["mean" if m == "pooling_mode_mean_tokens" else m for m in modes]
    if modes != ["mean"]:
        raise SentenceModelError(f"{path}: pooling mode {modes} is not supported (only mean pooling)")


def _read_prompts(path: Path) -> dict[str, str]:
    """`prompts` of config_sentence_transformers.json ({} when the file or key is absent)."""
    if not path.is_file():
        return {}
    config = _read_json(path)
    prompts = (config.get("prompts") if isinstance(config, dict) else None) or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise SentenceModelError(f"{path}: \"prompts\" must map names to strings")
    return prompts


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class SentenceEncoder(nn.Module):
    """Sentence embeddings: `encode(texts) -> (N, H)` for retrieval, differentiable `forward(features)` for training."""

    def __init__(self, encoder: BertEncoder, tokenizer: SentenceTokenizer, *, normalize: bool = False,
                 do_lower_case: bool = False, prompts: dict[str, str] | None = None,
                 memory_config: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.do_lower_case = do_lower_case  # already applied inside the tokenizer; saved back
        self.prompts: dict[str, str] = dict(prompts or {})            # name -> prefix, e.g. {"query": "query: "}
        self.memory_config: dict[str, Any] = dict(memory_config or {})  # e.g. {"threshold": 0.83}
        self.source: str | None = None  # the folder it was loaded from + its weights' stamp (cache identity)

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "SentenceEncoder":
        folder = Path(folder)
        if not folder.is_dir():
            raise SentenceModelError(f"{folder}: model folder not found")
        transformer_dir, normalize, sbert_config = folder, False, {}
        modules_path = folder / "modules.json"
        if modules_path.is_file():
            modules = _read_json(modules_path)
            if not isinstance(modules, list) or not modules:
                raise SentenceModelError(f"{modules_path}: expected a non-empty list of modules")
            if not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                       and isinstance(m.get("path", ""), str) and isinstance(m.get("idx", 0), int) for m in modules):
                raise SentenceModelError(f"{modules_path}: each module must be an object with a string \"type\" "
                                         "and \"path\" (and an integer \"idx\")")
            kinds = []
            for m in sorted(modules, key=lambda m: m.get("idx", 0)):
                kind = _module_kind(str(m.get("type", "")), modules_path)
                kinds.append(kind)
                sub = folder / m.get("path", "")
                if kind == "Transformer":
                    transformer_dir = sub
                elif kind == "Pooling":
                    _check_mean_pooling(sub / "config.json")
                else:
                    normalize = True
            if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
                raise SentenceModelError(f"{modules_path}: expected Transformer, Pooling[, Normalize], got {kinds}")
            for name in ("sentence_bert_config.json", "sentence_roberta_config.json"):
                if (transformer_dir / name).is_file():
                    sbert_config = _read_json(transformer_dir / name)
                    break
        encoder = load_encoder(transformer_dir, device=device)
        config = encoder.config
        tok_config_path = transformer_dir / "tokenizer_config.json"
        tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
        if sbert_config.get("max_seq_length"):  # legacy dialect
            max_len = int(sbert_config["max_seq_length"])
        else:  # 6.x dialect / plain HF folder: the tokenizer's limit, capped at the positions
            max_len = int(min(tok_config.get("model_max_length") or VERY_LARGE_LENGTH, VERY_LARGE_LENGTH))
        max_len = min(max_len, config.max_positions)
        do_lower_case = bool(sbert_config.get("do_lower_case", False))
        tokenizer = SentenceTokenizer.from_folder(transformer_dir, model_type=config.model_type,
                                                  max_seq_length=max_len, do_lower_case=do_lower_case,
                                                  fallback_pad_id=config.pad_token_id)
        prompts = _read_prompts(folder / ST_CONFIG)
        memory_config = _read_json(folder / MEMORY_CONFIG) if (folder / MEMORY_CONFIG).is_file() else {}
        if not isinstance(memory_config, dict):
            raise SentenceModelError(f"{folder / MEMORY_CONFIG}: expected a JSON object")
        model = cls(encoder, tokenizer, normalize=normalize, do_lower_case=do_lower_case, prompts=prompts,
                    memory_config=memory_config)
        weights = [p for p in transformer_dir.glob("model*.safetensors")]
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(weights)]
        model.source = f"{folder.resolve()}:{stamp}"
        return model

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value > self.encoder.config.max_positions:
            raise ValueError(f"max_seq_length {value} exceeds the model's {self.encoder.config.max_positions} "
                             "positions")
        self.tokenizer.max_seq_length = value

    @property
    def memory_threshold(self) -> float | None:
        """The calibrated cosine threshold saved with the model (None: not calibrated)."""
        value = self.memory_config.get("threshold")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def prompt(self, name: str | None) -> str:
        """The prefix for a prompt name ('' when the model stores none: MiniLM gets no prefix)."""
        return self.prompts.get(name, "") if name else ""

    @property
    def embedding_dim(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.word_embeddings.weight.device

    # ---- compute ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """input_ids, attention_mask (+ token_type_ids for BERT): (B, T) int64, truncated, padded to the longest."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings")
        return self.tokenizer(texts)

    def forward(self, features: dict[str, Tensor], normalize: bool | None = None) -> Tensor:
        """Differentiable sentence embeddings (B, H): mean over non-pad tokens, then L2 if configured."""
        device = self.device
        mask = features["attention_mask"].to(device)
        types = features.get("token_type_ids")
        h = self.encoder(features["input_ids"].to(device), mask,
                         None if types is None else types.to(device))  # (B, T, H)
        m = mask.unsqueeze(1).to(h.dtype)  # (B, 1, T)
        u = torch.bmm(m, h).squeeze(1) / m.sum(dim=2).clamp(min=1e-9)  # masked sum as one GEMM: (B, H)
        if self.normalize if normalize is None else normalize:
            u = F.normalize(u, p=2, dim=-1)
        return u

    def encode_query(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings of user messages (the `query` prompt, if the model has one)."""
        return self.encode(texts, batch_size=batch_size, prompt_name=QUERY)

    def encode_passage(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings of stored memory items (the `passage` prompt, if the model has one)."""
        return self.encode(texts, batch_size=batch_size, prompt_name=PASSAGE)

    def encode(self, texts: str | list[str], batch_size: int = 32, convert_to_numpy: bool = True,
               normalize: bool | None = None, prompt_name: str | None = None) -> np.ndarray | Tensor:
        """Embeddings (N, H) float32 in the input order ((H,) for one string). `normalize=None` follows the model;
        `prompt_name` prefixes every text with that stored prompt (as sentence-transformers' `prompt_name`).

        Texts are tokenized once, sorted by token count (longest first) and batched, so each batch pads only to
        rows of nearly the same length. Every text is encoded, repeated ones too (callers that hold many
        repeats, like pair evaluation, encode their distinct texts themselves), so sentences/s stays comparable.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        prefix = self.prompt(prompt_name)
        if prefix:
            texts = [prefix + t for t in texts]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.empty(len(texts), self.embedding_dim, dtype=torch.float32)
        if texts:
            was_training = self.training
            self.eval()
            try:
                encodings = self.tokenizer.encode(texts)
                order = sorted(range(len(texts)), key=lambda i: -len(encodings[i].ids))
                with torch.inference_mode():
                    for start in range(0, len(order), batch_size):
                        idx = order[start:start + batch_size]
                        features = self.tokenizer.collate([encodings[i] for i in idx])
                        out[torch.tensor(idx)] = self.forward(features, normalize).float().cpu()
            finally:
                self.train(was_training)
        result = out[0] if single else out
        return result.numpy() if convert_to_numpy else result

    # ---- saving -----------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, atomic: bool = True) -> Path:
        """Write a sentence-transformers folder (legacy dialect + model_max_length), atomically.

        `atomic=False` writes straight into `folder`: for a caller that already writes into a temporary folder
        it swaps in itself (train.loop.Trainer), so a kill never leaves nested temporary folders behind."""
        folder = Path(folder)
        hidden = self.embedding_dim

        def write(tmp: Path) -> None:
            _write_json(tmp / "config.json", self.encoder.config.to_hf_dict())
            save_encoder_weights(self.encoder, tmp / "model.safetensors")
            (tmp / "tokenizer.json").write_text(self.tokenizer.to_json_str(), encoding="utf-8")
            tok_config = dict(self.tokenizer.config)
            tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            pad = self.tokenizer.tokenizer.id_to_token(self.tokenizer.pad_token_id)
            if pad is not None:
                tok_config.setdefault("pad_token", pad)
            tok_config["model_max_length"] = self.max_seq_length
            _write_json(tmp / "tokenizer_config.json", tok_config)
            modules = [{"idx": 0, "name": "0", "path": "", "type": LEGACY_TYPES["Transformer"]},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": LEGACY_TYPES["Pooling"]}]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": LEGACY_TYPES["Normalize"]})
                _write_json(tmp / "2_Normalize" / "config.json", {})
            _write_json(tmp / "modules.json", modules)
            _write_json(tmp / "sentence_bert_config.json",
                        {"max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case})
            _write_json(tmp / "1_Pooling" / "config.json",
                        {"word_embedding_dimension": hidden,
                         **{k: k == "pooling_mode_mean_tokens" for k in POOLING_FLAGS}, "include_prompt": True})
            _write_json(tmp / ST_CONFIG,
                        {"prompts": dict(self.prompts), "default_prompt_name": None, "similarity_fn_name": "cosine"})
            if self.memory_config:
                _write_json(tmp / MEMORY_CONFIG, self.memory_config)

        if atomic:
            atomic_write_dir(folder, write)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            write(folder)
        return folder


__all__ = ["SentenceEncoder", "SentenceModelError", "QUERY", "PASSAGE", "MEMORY_CONFIG"]
