"""The one base class of the project's own errors: what a CLI turns into `error: <file or flag>: <problem>`.

    OhLoRAError(ValueError)          a problem with the user's input, files or settings; the message names the
      ├─ CheckpointError …           file (or flag) and says what is wrong, in one line
      └─ NonFiniteLossError …        (also a RuntimeError) training diverged: exit code 1, not 2

Every package's error class derives from it (keeping its own name and its ValueError ancestry), so
`core.cli.run_cli` catches exactly these — never a bare ValueError, which would hide real bugs.
"""
from __future__ import annotations


class OhLoRAError(ValueError):
    """A user-facing error; `str(e)` is the whole message, starting with the file or flag it is about."""

    exit_code = 2  # bad input; a failed run (diverged training) overrides it
