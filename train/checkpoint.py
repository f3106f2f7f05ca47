"""The resume state folder (OUT/state) train.loop.Trainer writes and reads back, checked.

    trainable.safetensors   the trainable tensors (full, also under FSDP), by unwrapped parameter name
    state.pt                optimizer, scheduler, grad scaler, RNG states (per rank), data position, best eval
                            loss, log size; plain tensors and values, read with torch.load(weights_only=True)
    meta.json               the same position in readable form, and the loop config

The folder is swapped in whole (core.atomic.atomic_write_dir). Reading it back, a missing, truncated, garbage
or foreign file is a `ResumeError` naming the file — one line, never a traceback.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.atomic import atomic_write_dir
from core.errors import OhLoRAError
from core.safetensors_io import CheckpointError, SafetensorsFile, read_state

STATE_VERSION = 2  # 2: the position is kept in global micro-batches (any world size resumes it)
REQUIRED = ("epoch", "micro", "global_step", "optimizer", "scheduler", "rng", "best_eval_loss", "train_tokens")


class ResumeError(OhLoRAError):
    """A --resume folder is missing, corrupt or does not match the model being trained."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):  # python's random state must be nested tuples again after (de)serialisation
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_state(folder: Path, tensors: dict[str, torch.Tensor], state: dict, meta: dict) -> None:
    """Swap in a complete state folder (a kill leaves the previous one, see core.atomic)."""
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    atomic_write_dir(folder, write)


def read_resume_state(folder: Path, shapes: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a state folder whose tensors must be exactly `shapes` (name -> shape), all finite."""
    tensor_file, state_file = folder / "trainable.safetensors", folder / "state.pt"
    if not state_file.is_file() or not tensor_file.is_file():
        raise ResumeError(f"{folder}: not a resume state folder (expected state.pt and "
                          "trainable.safetensors, as written to OUT/state)")
    try:
        f = SafetensorsFile(tensor_file)
        tensors = read_state({k: (f, k) for k in f.keys()})
    except (CheckpointError, OSError) as err:
        raise ResumeError(f"{tensor_file}: unreadable ({err}); resume from an intact state") from None
    if sorted(tensors) != sorted(shapes):
        missing = sorted(set(shapes) - set(tensors))[:3]
        raise ResumeError(f"{tensor_file}: the saved trainable tensors do not match this model "
                          f"(e.g. missing {missing}); same --lora-r/--lora-targets/--model?")
    for name, shape in shapes.items():
        if tensors[name].shape != shape:
            raise ResumeError(f"{tensor_file}: {name} has shape {tuple(tensors[name].shape)}, "
                              f"the model {tuple(shape)}")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise ResumeError(f"{tensor_file}: {name} holds NaN/inf values")
    try:  # a truncated or garbage file fails in the zip reader or the unpickler, each with its own type
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        missing = [key for key in REQUIRED if key not in state]
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [""])[0]  # torch's unpickler errors run over many lines
        raise ResumeError(f"{state_file}: unreadable or incomplete ({type(err).__name__}: {first})") from None
    if missing:
        raise ResumeError(f"{state_file}: incomplete (no {', '.join(missing)})")
    return tensors, state
