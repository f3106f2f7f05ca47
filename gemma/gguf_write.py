"""Write a Gemma-2 / Gemma-3 model as a GGUF file llama.cpp (and Ollama, and transformers' GGUF loader) reads.

    write_gguf(model, "out.gguf", "q8_0", metadata=gguf_file.metadata)     # or tokenizer_metadata(folder)

The mirror of gguf_io.py: llama.cpp's converter conventions (convert_hf_to_gguf.py, Gemma2Model / Gemma3Model)
redone, with the `gguf` package's GGUFWriter:

* names: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight` ... (gguf_io.GGUF_TO_HF reversed);
* every RMSNorm weight stored as `1 + w`, in F32 (ggml's norm multiplies by the stored weight);
* the LM head written only when not tied (`output.weight`);
* metadata: `{arch}.context_length`, embedding / feed-forward lengths, heads, key/value lengths, rms eps,
  sliding window, rope base (+ linear scaling), Gemma 2's soft-caps; `general.file_type`;
* tensor types: 1-D tensors F32; 2-D F16, BF16 or Q8_0 (`gguf.quants.quantize`; a row length that is not a
  multiple of Q8_0's 32-value block falls back to F16, as llama.cpp does);
* tokenizer: the `tokenizer.*` keys of the source GGUF carried over as they are, or rebuilt from an HF folder's
  tokenizer.json (the folder `python -m gemma.convert` writes: same pieces, types and scores).

What GGUF cannot say (the local rope base, the sliding-window pattern, query_pre_attn_scalar) llama.cpp takes
from the family's defaults; a model that differs from them is refused with one line rather than written wrong.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import atomic_write_file
from core.jsonio import read_json

from .config import DEFAULTS, default_layer_types
from .gguf_io import LARGE_27B_LAYERS, GGUFError, GGUFFile, StringArray, _gguf_name
from .model import GemmaForCausalLM
from .tokenizer import CONTROL, USER_DEFINED

TYPES = ("f16", "bf16", "q8_0")  # what `write_gguf` writes (2-D tensors); norms stay F32
NORMAL, UNUSED, BYTE = 1, 5, 6  # llama.cpp's token types (CONTROL 3 and USER_DEFINED 4 from tokenizer.py)
SPECIAL_SCORE = -1000.0  # llama.cpp's score of every non-normal piece; normal ones score -(their rank)


def _gguf_types(kind: str):
    import gguf

    tensor = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    file = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    return tensor, file


def check_expressible(model: GemmaForCausalLM, path: str | os.PathLike) -> None:
    """Refuse (GGUFError naming `path`) a model whose settings GGUF metadata cannot carry to llama.cpp."""
    c = model.config
    arch = "gemma2" if c.model_type == "gemma2" else "gemma3"
    defaults = DEFAULTS[c.model_type]
    problems = []
    if c.layer_types != default_layer_types(c.num_hidden_layers, defaults["sliding_window_pattern"]):
        problems.append(f"layer_types {c.layer_types} (llama.cpp assumes every "
                        f"{defaults['sliding_window_pattern']}th layer global)")
    if c.model_type == "gemma3_text" and c.rope_local_base_freq != 10000.0:
        problems.append(f"rope_local_base_freq {c.rope_local_base_freq:g} (llama.cpp assumes 10000)")
    scalar = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == LARGE_27B_LAYERS[arch] else c.head_dim
    if c.query_pre_attn_scalar != scalar:
        problems.append(f"query_pre_attn_scalar {c.query_pre_attn_scalar:g} (llama.cpp assumes {scalar})")
    if c.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        problems.append(f"hidden_activation {c.hidden_activation} (llama.cpp uses the tanh GELU)")
    if problems:
        raise GGUFError(f"{path}: this model cannot be written as GGUF: " + "; ".join(problems))


def tokenizer_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys for an HF folder's tokenizer.json + tokenizer_config.json (Gemma's
    SentencePiece vocabulary as BPE): pieces by id, llama.cpp token types (special added tokens CONTROL, other
    added ones USER_DEFINED, `<0x..>` BYTE, runs of "▁" USER_DEFINED spelled with spaces again, as llama.cpp
    stores them), scores -rank for normal pieces and -1000 for the rest, the special ids, add_bos/eos."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    tj = read_json(path, GGUFError)
    model = tj.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise GGUFError(f"{path}: expected Gemma's BPE tokenizer.json (model.type BPE with a vocab), "
                        f"got model.type {model.get('type')!r}")
    pieces = [""] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        pieces[i] = piece
    added = {int(t["id"]): bool(t.get("special")) for t in tj.get("added_tokens") or []}
    for t in tj.get("added_tokens") or []:
        if int(t["id"]) >= len(pieces):
            pieces.extend([""] * (int(t["id"]) + 1 - len(pieces)))
        pieces[int(t["id"])] = t["content"]
    if "" in pieces:
        raise GGUFError(f"{path}: token id {pieces.index('')} has no piece (the vocabulary has holes)")
    types, scores, rank = [], [], 0
    for i, piece in enumerate(pieces):
        if i in added:
            kind = CONTROL if added[i] else USER_DEFINED
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = BYTE
        elif len(piece) > 1 and set(piece) == {"\u2581"}:
            kind, pieces[i] = USER_DEFINED, " " * len(piece)  # llama.cpp stores space runs with real spaces
        else:
            kind = NORMAL
        types.append(kind)
        scores.append(-float(rank) if kind == NORMAL else SPECIAL_SCORE)
        rank += kind == NORMAL
    config_path = folder / "tokenizer_config.json"
    tc = read_json(config_path, GGUFError) if config_path.is_file() else {}
    index = {p: i for i, p in enumerate(pieces)}
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
                            "tokenizer.ggml.token_type": types}
    for role, key, default in (("bos_token", "bos_token_id", "<bos>"), ("eos_token", "eos_token_id", "<eos>"),
                               ("unk_token", "unknown_token_id", "<unk>"), ("pad_token", "padding_token_id",
                                                                            "<pad>")):
        name = tc.get(role, default)
        name = name.get("content") if isinstance(name, dict) else name
        if name in index:
            meta[f"tokenizer.ggml.{key}"] = index[name]
    meta["tokenizer.ggml.add_bos_token"] = bool(tc.get("add_bos_token", True))
    meta["tokenizer.ggml.add_eos_token"] = bool(tc.get("add_eos_token", False))
    meta["tokenizer.ggml.add_space_prefix"] = False
    if isinstance(tc.get("chat_template"), str):
        meta["tokenizer.chat_template"] = tc["chat_template"]
    return meta


def _add_tokenizer(w, meta: dict[str, Any], vocab_size: int, path: Path) -> None:
    """Every `tokenizer.*` key of `meta` (a GGUFFile's metadata or `tokenizer_metadata`), typed as llama.cpp
    writes them; the piece list padded to the model's rows with unused `[PAD{i}]` pieces (llama.cpp's way)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens to write (the source has no tokenizer metadata)")
    tokens = tokens.tolist() if isinstance(tokens, StringArray) else list(tokens)
    scores = np.asarray(meta.get("tokenizer.ggml.scores", [0.0] * len(tokens)), dtype=np.float32).tolist()
    types = np.asarray(meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens)), dtype=np.int32).tolist()
    if len(tokens) > vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {len(tokens)} pieces, the model only {vocab_size} rows")
    pad = range(len(tokens), vocab_size)
    w.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    w.add_token_scores(scores + [SPECIAL_SCORE] * len(pad))
    w.add_token_types(types + [UNUSED] * len(pad))
    done = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}
    for key, value in meta.items():
        if not key.startswith("tokenizer.") or key in done:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            w.add_uint32(key, int(value))  # token ids: llama.cpp writes them as uint32
        elif isinstance(value, (float, np.floating)):
            w.add_float32(key, float(value))
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, StringArray):
            w.add_array(key, value.tolist())  # e.g. tokenizer.ggml.merges
        elif isinstance(value, (list, np.ndarray)):
            w.add_array(key, np.asarray(value).tolist())


def _add_config(w, model: GemmaForCausalLM, arch: str, file_type: int, name: str, meta: dict[str, Any]) -> None:
    import gguf

    c = model.config
    w.add_name(name)
    w.add_type("model")
    if isinstance(meta.get("general.license"), str):  # a fine-tune keeps its base's licence (Gemma: "gemma")
        w.add_license(meta["general.license"])
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling_factor != 1.0:  # Gemma 3 1B+: linear scaling of the global layers' positions
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    if arch == "gemma2":
        if c.attn_logit_softcapping is not None:
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        if c.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(c.final_logit_softcapping)


def _tensor(data: np.ndarray, kind: str):
    """(array, raw_dtype or None) for GGUFWriter.add_tensor: 1-D F32, 2-D in `kind` (Q8_0 needs 32 | cols)."""
    import gguf
    from gguf.quants import quantize

    if data.ndim == 1:
        return data.astype(np.float32), None
    qtype, _ = _gguf_types(kind)
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return quantize(data, qtype), qtype  # BF16 / Q8_0: raw bytes, shape from the byte shape


@torch.no_grad()
def write_gguf(model: GemmaForCausalLM, path: str | os.PathLike, kind: str = "f16",
               metadata: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """Write `model` (merged: plain Gemma weights only) to `path` with 2-D tensors in `kind` (f16 | bf16 |
    q8_0). `metadata`: the source GGUFFile's `metadata` (its `tokenizer.*` keys and `general.license` are
    carried over) or `tokenizer_metadata(folder)`. Atomic: the file appears only when complete."""
    import gguf

    path = Path(path)
    if kind not in TYPES:
        raise GGUFError(f"{path}: GGUF tensor type {kind!r} is not supported (only {', '.join(TYPES)})")
    if not isinstance(model, GemmaForCausalLM):
        raise GGUFError(f"{path}: GGUF export writes Gemma-2 / Gemma-3 models, not {type(model).__name__}")
    check_expressible(model, path)
    c = model.config
    arch = "gemma2" if c.model_type == "gemma2" else "gemma3"
    state = model.state_dict()
    tensors = []
    for key, value in state.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue  # one matrix, stored once as token_embd (llama.cpp ties it back)
        gguf_name = _gguf_name(key)
        if gguf_name == key:
            raise GGUFError(f"{path}: {key} is not a Gemma weight (merge the adapters first: lora.merge_lora)")
        data = value.detach().to("cpu", torch.float32).numpy()
        if gguf_name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp's Gemma convention: the stored weight is the scale 1 + w
        tensors.append((gguf_name, *_tensor(data, kind)))

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        _add_config(w, model, arch, _gguf_types(kind)[1], name or path.stem, metadata or {})
        _add_tokenizer(w, metadata or {}, c.vocab_size, path)
        for tensor_name, data, raw_dtype in tensors:
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write_file(path, write)



def export_gguf(model: GemmaForCausalLM, path: str | os.PathLike, kind: str, base: str | os.PathLike,
                base_gguf: GGUFFile | None = None) -> Path:
    """A merged fine-tune of `base` as a GGUF file: the tokenizer metadata (and general.license) carried over
    from the base GGUF when it is one (`base_gguf`, already opened), else rebuilt from the base folder's
    tokenizer.json."""
    metadata = base_gguf.metadata if base_gguf is not None else tokenizer_metadata(base)
    return write_gguf(model, path, kind, metadata=metadata, name=Path(path).stem)
