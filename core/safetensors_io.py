"""Safetensors model folders, read lean and checked strictly; written sharded and atomically.

    weight_files(folder)        the shards an index lists, or model.safetensors (pickle .bin refused)
    SafetensorsFile(path)       header parsed and validated up front; tensors read one by one with readinto
    match_keys(...)             every file key mapped to a model key, all problems reported in one error
    read_state(...)             file by file, tensor by tensor, cast on the way: peak = result + one buffer
    save_weights(state, folder) model.safetensors, or shards + index above max_shard_size, each file atomic

Used by every model family (gptneox/, gemma/) and by sbert/'s encoder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Pattern

import torch
from safetensors.torch import save_file

from core.atomic import atomic_write_dir, atomic_write_file, atomic_write_text
from core.errors import OhLoRAError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(OhLoRAError):
    """A model folder whose files do not match the config (the message names the folder and the keys)."""


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

    def read(self, key: str, fh, dtype: torch.dtype | None, staging: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key` as `dtype`: read straight into the result when the file already has that dtype,
        else into `staging` (a reused uint8 buffer, so conversions allocate nothing but their results)."""
        entry = self.entries[key]
        src_dtype = ST_DTYPES.get(entry["dtype"])
        if src_dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        n = end - begin
        dtype = src_dtype if dtype is None else dtype
        convert = src_dtype != dtype
        raw = staging[:n] if convert and staging is not None and staging.numel() >= n else \
            torch.empty(n, dtype=torch.uint8)
        fh.seek(self.data_start + begin)
        if n and fh.readinto(raw.numpy()) != n:
            raise CheckpointError(f"{self.path}: tensor {key} is truncated")
        t = raw.view(src_dtype).view(entry["shape"]) if n else torch.empty(entry["shape"], dtype=src_dtype)
        return t.to(dtype) if convert else t


def match_keys(files: list[SafetensorsFile], expected: dict[str, tuple[int, ...]], source: str | os.PathLike,
               *, aliases: dict[str, str] | None = None, ignored: Pattern[str] | None = None,
               optional: Iterable[str] = (), rename: Callable[[str], str] | None = None
               ) -> dict[str, tuple[SafetensorsFile, str]]:
    """Map every tensor of `files` onto the model keys `expected` (key -> shape), checking names and shapes.

    A file key is renamed by `rename` (e.g. strip a prefix) and then `aliases`; keys matching `ignored` are
    skipped (buffers old checkpoints carry). Missing (not in `optional`), unexpected and mis-shaped tensors are
    all listed in one CheckpointError naming `source`. Returns model key -> (file, key in file)."""
    aliases, optional = aliases or {}, set(optional)
    found: dict[str, tuple[SafetensorsFile, str]] = {}
    unexpected, mismatched = [], []
    for f in files:
        for file_key in f.keys():
            key = rename(file_key) if rename else file_key
            key = aliases.get(key, key)
            if ignored is not None and ignored.search(key):
                continue
            if key not in expected:
                unexpected.append(file_key)
                continue
            if f.shape(file_key) != tuple(expected[key]):
                mismatched.append(f"{file_key} {f.shape(file_key)} (expected {tuple(expected[key])})")
            found[key] = (f, file_key)
    missing = [k for k in expected if k not in found and k not in optional]
    problems = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match config.json: " + "; ".join(problems))
    return found


def read_state(found: dict[str, tuple[SafetensorsFile, str]], dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read the matched tensors, cast to `dtype` (None: keep each file dtype), onto `device`.

    File by file, tensor by tensor, through one reused staging buffer: peak = the result + one source tensor.
    With `check_finite`, a float tensor holding NaN/inf is a CheckpointError naming the file and tensor (a
    broken checkpoint would otherwise surface much later as `probability tensor contains inf, nan`)."""
    device = torch.device(device)
    files = list(dict.fromkeys(f for f, _ in found.values()))
    staging = torch.empty(max((f.nbytes(k) for f, k in found.values()), default=0), dtype=torch.uint8)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with open(f.path, "rb") as fh:
            for key, (owner, file_key) in found.items():
                if owner is f:
                    t = f.read(file_key, fh, dtype, staging)
                    if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise CheckpointError(f"{f.path}: tensor {file_key} holds NaN/inf values")
                    state[key] = t.to(device)
    return state


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike):
    """Put checked tensors into a model built on the meta device (no copy), re-tie, return it in eval mode."""
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after match_keys; guard against silent garbage
        raise CheckpointError(f"{source}: parameters left unloaded: {', '.join(still_meta)}")
    return model.eval()


def read_folder(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (no key check): for small models and converters."""
    files = [SafetensorsFile(path) for path in weight_files(folder)]
    found = {k: (f, k) for f in files for k in f.keys()}
    return read_state(found, dtype)


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


def save_weights(state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_size: int | str = "2GB"
                 ) -> list[str]:
    """Write model.safetensors, or shards + index when over max_shard_size; return the file names written."""
    folder, max_bytes = Path(folder), parse_size(max_shard_size)
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
        atomic_write_file(folder / SINGLE_FILE, lambda tmp: save_file(shards[0], str(tmp), metadata={"format": "pt"}))
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write_file(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    atomic_write_file(folder / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2), encoding="utf-8"))
    return names + [INDEX_FILE]


def save_folder(state: dict[str, torch.Tensor], folder: str | os.PathLike, texts: dict[str, str],
                max_shard_size: int | str = "2GB") -> Path:
    """Write weights (+ small text files such as config.json) as an HF model folder.

    A new folder appears only when complete (written beside it, then renamed); in an existing folder each file
    is replaced atomically and stale weight files of an earlier save are removed. Other files (tokenizer,
    adapters) are left alone."""
    folder = Path(folder)
    if not folder.exists():
        def write(tmp: Path) -> None:
            save_weights(state, tmp, max_shard_size)
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")
        return atomic_write_dir(folder, write)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    written = set(save_weights(state, folder, max_shard_size))
    for name, text in texts.items():
        atomic_write_text(folder / name, text)
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        if stale.is_file() and stale.name not in written:
            stale.unlink()
    return folder
