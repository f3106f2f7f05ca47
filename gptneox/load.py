"""Load and save GPT-NeoX model folders in Hugging Face format (config.json + safetensors), never pickle.

Keys are the HF checkpoint's own names (our modules are named like HF's), so loading is a 1:1 copy:
`gpt_neox.embed_in.weight`, `gpt_neox.layers.{i}.{input_layernorm,post_attention_layernorm}.{weight,bias}`,
`gpt_neox.layers.{i}.attention.{query_key_value,dense}.{weight,bias}`,
`gpt_neox.layers.{i}.mlp.{dense_h_to_4h,dense_4h_to_h}.{weight,bias}`, `gpt_neox.final_layer_norm.{weight,bias}`,
`embed_out.weight` (absent when tie_word_embeddings: then it is embed_in's matrix).

Loading is lean: the module is built on the meta device (no random weights), each tensor is read from its
shard with plain file reads (no mmap) and cast to the requested dtype on the way, then assigned
(`load_state_dict(assign=True)`); peak memory stays near one copy of the weights in the target dtype.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import GPTNeoXConfig
from .model import GPTNeoXForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers old checkpoints carry that are not weights (recomputed by the model): ignored when loading.
IGNORED_KEY = re.compile(r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
KEY_ALIASES = {"lm_head.weight": "embed_out.weight"}  # transformers 5.x's in-memory name for embed_out


class CheckpointError(ValueError):
    """A model folder whose files do not match the config (the message names the folder and the keys)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder: the shards listed by the index, or model.safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed but not found: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only pickle weights (pytorch_model.bin) found; safetensors is required "
                              f"(convert once with a trusted tool, or save with safe_serialization=True)")
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _expected_shapes(model: GPTNeoXForCausalLM) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# safetensors dtype names -> torch dtypes (the format: 8-byte little-endian header size, JSON header, raw data)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class SafetensorsFile:
    """Reads tensors from one .safetensors file with plain `readinto` (no mmap).

    Why not safe_open: its whole-file mmap keeps every page it has touched resident until closed, so loading an
    fp16 shard as bf16 held the shard *and* its converted copy. Reading tensor by tensor into our own buffers
    keeps the peak at the converted weights plus one source tensor, and the result never aliases the file.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (bad header size)")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self.data_start, self.entries = 8 + n, header
        for key, entry in header.items():
            try:
                dtype, shape, (begin, end) = ST_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors entry for {key}") from None
            numel = 1
            for dim in shape:
                numel *= dim
            if dtype is not None and (end - begin != numel * dtype.itemsize or self.data_start + end > size):
                raise CheckpointError(f"{path}: tensor {key} is truncated or has a wrong byte size")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.entries[key]["data_offsets"]
        return end - begin

    def read(self, key: str, fh, dtype: torch.dtype, staging: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key` as `dtype`: read straight into the result when the file already has that dtype,
        else into `staging` (a reused uint8 buffer, so conversions allocate nothing but their results)."""
        entry = self.entries[key]
        src_dtype = ST_DTYPES.get(entry["dtype"])
        if src_dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        n = end - begin
        convert = src_dtype != dtype
        raw = staging[:n] if convert and staging is not None and staging.numel() >= n else \
            torch.empty(n, dtype=torch.uint8)
        fh.seek(self.data_start + begin)
        if n and fh.readinto(raw.numpy()) != n:
            raise CheckpointError(f"{self.path}: tensor {key} is truncated")
        t = raw.view(src_dtype).view(entry["shape"]) if n else torch.empty(entry["shape"], dtype=src_dtype)
        return t.to(dtype) if convert else t


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> GPTNeoXForCausalLM:
    """Build GPTNeoXForCausalLM from an HF folder (config.json + model.safetensors or sharded safetensors).

    Returns the model in eval mode, weights in `dtype` on `device`. Missing/unexpected keys or shape mismatches
    raise CheckpointError listing all of them.
    """
    folder = Path(folder)
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    config = GPTNeoXConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    expected = _expected_shapes(model)
    optional = {"embed_out.weight"} if config.tie_word_embeddings else set()

    # 1) Check every key and shape from the headers before reading any data.
    found: dict[str, tuple[SafetensorsFile, str]] = {}  # our key -> (file, key in file)
    unexpected, mismatched = [], []
    for f in files:
        for file_key in f.keys():
            key = KEY_ALIASES.get(file_key, file_key)
            if IGNORED_KEY.search(key):
                continue
            if key not in expected:
                unexpected.append(file_key)
                continue
            if f.shape(file_key) != expected[key]:
                mismatched.append(f"{file_key} {f.shape(file_key)} (expected {expected[key]})")
            found[key] = (f, file_key)
    missing = [k for k in expected if k not in found and k not in optional]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match config.json: " + "; ".join(problems))

    # 2) Read file by file, tensor by tensor, casting as we go: peak = the result + one staging buffer.
    device = torch.device(device)
    staging = torch.empty(max((f.nbytes(k) for f, k in found.values()), default=0), dtype=torch.uint8)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with open(f.path, "rb") as fh:
            for key, (owner, file_key) in found.items():
                if owner is f:
                    state[key] = f.read(file_key, fh, dtype, staging).to(device)
    del staging
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after the key check above; guard against silent garbage
        raise CheckpointError(f"{folder}: parameters left unloaded: {', '.join(still_meta)}")
    return model.eval()


def parse_size(size: int | str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000 (HF's max_shard_size spelling)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '2GB' / '500MB'")
    unit = m.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_bytes: int) -> list[str]:
    """Write model.safetensors, or shards + index when over max_bytes; return the file names written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + n > max_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t
        sizes[-1] += n
    if len(shards) == 1:
        _atomic(folder / SINGLE_FILE, lambda tmp: save_file(shards[0], str(tmp), metadata={"format": "pt"}))
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    _atomic(folder / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2), encoding="utf-8"))
    return names + [INDEX_FILE]


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename into place: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: GPTNeoXForCausalLM, folder: str | os.PathLike,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write `folder` in HF format (config.json + model.safetensors, or shards + index above max_shard_size).

    transformers.GPTNeoXForCausalLM.from_pretrained loads the result. A new folder appears only when complete
    (written beside it, then renamed); in an existing folder each file is replaced atomically and stale weight
    files of an earlier save are removed. Other files (tokenizer, adapters) are left alone.
    """
    folder = Path(folder)
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        expected = _expected_shapes(GPTNeoXForCausalLM(config))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{folder}: model has parameters that are not GPT-NeoX weights "
                              f"(merge or remove adapters first): {', '.join(unexpected[:8])}"
                              + (" ..." if len(unexpected) > 8 else ""))
    if config.tie_word_embeddings:
        state.pop("embed_out.weight", None)  # one matrix, stored once as embed_in (as HF does)
    max_bytes = parse_size(max_shard_size)
    hf_config = config.to_hf_dict(dtype=_dtype_name(model.dtype))
    config_text = json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n"

    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            _write_weights(state, tmp, max_bytes)
            (tmp / "config.json").write_text(config_text, encoding="utf-8")
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    written = set(_write_weights(state, folder, max_bytes))
    _atomic(folder / "config.json", lambda tmp: tmp.write_text(config_text, encoding="utf-8"))
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        if stale.is_file() and stale.name not in written:
            stale.unlink()
    return folder
