"""Atomic writes: a file or folder is either the old one or the complete new one, never half-written.

Files are written to a temporary name in the same folder and renamed into place (`os.replace` is atomic on
one file system); folders are written to a temporary sibling and swapped in. A folder swap takes two renames
(`path -> .path.old`, then `.path.TMP.tmp -> path`); a kill between them leaves only `.path.old`, which
`recover_dir` (run before every swap and by every reader that resumes) moves back, so a complete folder always
exists under one of the two names.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _usual_mode(tmp: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private) entries; give the renamed result the mode a plain
    open()/mkdir() would have had (0666/0777 less the umask), so saved models are readable as usual."""
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path to `path`. On error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _usual_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> Path:
    """Undo a swap a crash interrupted: bring `.path.old` back when `path` is missing, drop it otherwise."""
    path = Path(path)
    old = _old_name(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    return path


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (`.path.*.tmp`) that killed writers of `path` left; returns them.

    Call it only where no other process is writing `path` (the start of a run that owns its output folder)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return stale


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` to fill a fresh folder, then swap it in place of `path`.

    The old folder (if any) is moved aside first and deleted only after the new one is in place, so a crash
    leaves either the old or the new folder (see `recover_dir`), plus at worst a stale `.tmp` sibling.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        _usual_mode(tmp, is_dir=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recover_dir(path)
    old = _old_name(path)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
