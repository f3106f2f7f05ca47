"""Gemma's tokenizer as a `tokenizers.Tokenizer`, built from a GGUF file's metadata or read from tokenizer.json.

A GGUF holds the SentencePiece vocabulary (pieces, scores, piece types, special ids) but no tokenizer.json.
It is rebuilt the way transformers' GGUF loader builds `GemmaTokenizer` (integrations/gguf/
gguf_tokenizer_mapping.py), so the ids are the same:

* a BPE model over the pieces, byte fallback (`<0x..>` pieces), `<unk>` fused, no dropout;
* spaces -> "▁" by the normalizer (no prefix space: `add_space_prefix` is false for Gemma), "▁" -> " " back;
* pieces made only of whitespace with spaces in them ("  ", "   ", ...) are stored with real spaces by
  llama.cpp's converter; they are respelled with "▁" so the normalised text reaches them;
* the file has no merges: they are derived from the vocabulary, every split of a piece into two pieces, in the
  order the pieces appear in the file (its scores do not follow the merge order), longer left half first;
* CONTROL pieces (`<bos>`, `<start_of_turn>`, ...) are special added tokens, USER_DEFINED ones ("\\n\\n", ...)
  plain added tokens matched whole, as llama.cpp does; BOS is prepended (`add_bos_token`), EOS is not.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from core.tokenizer import Tokenizer as TokenizerWrapper
from core.tokenizer import TokenizerError

from .gguf_io import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPECIAL_ROLES = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


def _respell(piece: str) -> str:
    return piece.replace(" ", "\u2581") if " " in piece and not piece.strip() else piece


def derive_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) with left + right a piece and both halves pieces: by the piece's position, then by
    longer left half (the rank order transformers' `generate_merges` gives a position-scored vocabulary)."""
    merges = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def special_tokens(f: GGUFFile) -> dict[str, str | None]:
    """{"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"} from the ids."""
    pieces = f.metadata["tokenizer.ggml.tokens"]
    out = {}
    for role, key in SPECIAL_ROLES.items():
        token_id = f.metadata.get(f"tokenizer.ggml.{key}")
        out[role] = pieces[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(pieces) else None
    return out


def tokenizer_from_gguf(path: str | os.PathLike | GGUFFile) -> Tokenizer:
    """The `tokenizers.Tokenizer` a Gemma GGUF's metadata describes (ids equal transformers' from the same file)."""
    f = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    meta, src = f.metadata, str(f.path)
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":  # llama.cpp's name for a SentencePiece vocabulary, which every Gemma 2/3 file has
        raise GGUFError(f"{src}: tokenizer.ggml.model {model!r} is not supported (Gemma files say 'llama')")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{src}: metadata key tokenizer.ggml.tokens is missing")
    original = meta["tokenizer.ggml.tokens"].tolist()
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(original)
    if len(types) != len(original):
        raise GGUFError(f"{src}: {len(types)} token types for {len(original)} tokens")
    pieces = [_respell(p) for p in original]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    special = special_tokens(f)
    unk = special["unk_token"] or "<unk>"
    if unk not in vocab:
        raise GGUFError(f"{src}: unknown token {unk!r} is not in the vocabulary")
    tok = Tokenizer(BPE(vocab=vocab, merges=derive_merges(pieces, vocab), unk_token=unk, fuse_unk=True,
                        byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")  # as GemmaTokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                            for p, t in zip(pieces, types) if t == CONTROL])
    # user-defined pieces are matched whole in the raw text; the respelled space runs are left to the merges
    tok.add_tokens([AddedToken(p, normalized=False, special=False)
                    for p, o, t in zip(pieces, original, types) if t == USER_DEFINED and p == o])
    # what HF's update_post_processor writes: [bos] $A [eos], pair [bos] $A [eos] [bos] $B [eos]
    bos = special["bos_token"] if meta.get("tokenizer.ggml.add_bos_token", True) else None
    eos = special["eos_token"] if meta.get("tokenizer.ggml.add_eos_token", False) else None
    if bos or eos:
        def seq(a: str, type_id: int) -> str:
            return " ".join([f"{bos}:{type_id}"] * bool(bos) + [f"{a}:{type_id}"] + [f"{eos}:{type_id}"] * bool(eos))
        tok.post_processor = processors.TemplateProcessing(
            single=seq("$A", 0), pair=f"{seq('$A', 0)} {seq('$B', 1)}",
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)])
    return tok


def load_gguf_tokenizer(f: GGUFFile) -> TokenizerWrapper:
    """The project's tokenizer interface (core.tokenizer) over a GGUF's vocabulary, with its special tokens."""
    names = special_tokens(f)
    return TokenizerWrapper(tokenizer_from_gguf(f), eos_token=names["eos_token"], pad_token=names["pad_token"],
                            bos_token=names["bos_token"], source=str(f.path))


def gguf_tokenizer_files(f: GGUFFile) -> dict[str, str]:
    """The HF tokenizer files of a GGUF's vocabulary (what an HF folder exported from a GGUF base carries)."""
    return tokenizer_files(tokenizer_from_gguf(f), f)


def tokenizer_files(tok: Tokenizer, f: GGUFFile) -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} for an HF folder (transformers' AutoTokenizer and
    our loaders read them back)."""
    meta = f.metadata
    config = {"tokenizer_class": "GemmaTokenizer", **special_tokens(f),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "padding_side": "left", "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2,
                                                                                ensure_ascii=False) + "\n"}


def tokenizer_from_folder(folder: str | os.PathLike) -> Tokenizer:
    """tokenizer.json of an HF folder (e.g. one written by `python -m gemma.convert`)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer.json not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{path}: cannot read tokenizer: {e}") from None
