"""One command-line vocabulary for every `python -m ...`, and one way to fail: `error: <flag or file>: <problem>`.

Flags are built from dataclass configs: field `max_length: int | None` -> `--max-length N`, the type from the
annotation, the default from the field, help / range / choices from its metadata. Every number is checked where
it is parsed (finite, in range), so a bad value never reaches the code: `--epochs 0` ->
`error: --epochs: must be >= 1, got 0`, exit code 2. The project's own errors (`core.errors.OhLoRAError`) and
OS errors become the same one line and exit 2; anything else is a bug and keeps its traceback. `--debug`
re-raises for a traceback.

The vocabulary (README "Command-line flags"): `--model` the model to load or fine-tune from, `--adapter`,
`--data`, `--output-dir`, `--memory-store`, `--memory-model`, `--max-length`, `--threads`, `--device`,
`--dtype {auto,fp32,bf16}`, `--seed`, `--batch-size`, `--epochs`, `--max-steps`, `--lr`.

One pattern for every command: its flags are the `flag()` fields of dataclasses, added with `add_config_flags`
and read back with `config_from_args`; nothing is declared with `add_argument` by hand. **Adding a flag = adding
one dataclass field with flag() metadata** to the config that owns the setting (train.sft's own flags:
`train.sft.SFTOptions`; the loop's: `train.loop.LoopConfig`; the adapter's: `lora.LoRAConfig`, shown with
`prefix="lora_"`; sampling: `infer.sampler.SamplingConfig`; S-BERT training: `sbert.train.TrainConfig`), e.g.

    variant: str = flag("lora", choices=("lora", "dora"), help="adapter kind")   # in LoRAConfig: --lora-variant
    quantize_base: bool = flag(False, help="4-bit base weights")                 # in SFTOptions: --quantize-base

and the value reaches the command's config through `config_from_args` (train.sft builds its LoRAConfig with
`config_from_args(LoRAConfig, args, prefix="lora_")`). tests/test_cli_flags.py records every command's flags:
regenerate its record (`python -m tests.test_cli_flags`) with a new flag and review the diff.

A field declared without flag() gets no flag. Presets are data: dicts of field values applied to what the user
did not give (train.sft's ORIGINAL / TINY_DEMO / GEMMA_DEMO; `dataclasses.replace(cfg, **preset)` on a config).

A new CLI (e.g. a converter):

    from dataclasses import dataclass
    from core.cli import COUNT, Parser, add_config_flags, config_from_args, flag, run_cli

    @dataclass
    class ConvertConfig:
        model: str = flag(None, help="source .gguf file", kind="file", positional=True)
        output_dir: str = flag(None, help="HF folder to write", kind="output_dir", required=True)
        dtype: str = flag("fp32", help="weights dtype written", choices=("fp32", "bf16"))
        threads: int | None = flag(None, help="CPU threads", range=COUNT)

    @run_cli                                        # OhLoRAError / OSError -> one line, exit 2; --debug
    def main(argv: list[str] | None = None) -> int:
        p = Parser(prog="python -m gemma.convert", description=__doc__.split("\n\n")[0])
        add_config_flags(p, ConvertConfig)          # MODEL, --output-dir, --dtype, --threads (+ --debug)
        cfg = config_from_args(ConvertConfig, p.parse_args(argv))
        ...                                         # raise your package's error (an OhLoRAError) naming the file
        return 0

`flag()` keys: `help`, `range` (interval strings: COUNT "[1, inf)", NONNEG "[0, inf)", POSITIVE "(0, inf)",
RATIO "[0, 1]", COSINE "[-1, 1]"), `choices`, `flag` (the name, default `--kebab-field`), `aliases` (deprecated
spellings, accepted with a note), `kind` (a path or device checked at parse time: "output_dir" (not a file, not
under one), "output_file" (not a folder), "dir" / "file" / "path" (must exist), "device" (known and present:
`--device cuda` on a CPU build is a clean error)), `parse` (the caller's own argparse `type=`, e.g.
infer.models.check_model_path), `metavar`, `required`, `positional`, `exclusive` (a mutually exclusive group's
name) and `dest`. A command showing another owner's config may override a field's `default` and `help` only
(`overrides={"epochs": {"default": None, "help": "default 3 (8 for the tiny default)"}}`: its presets' words);
`only=` / `exclude=` pick fields; `argparse_metavars=True` keeps argparse's own placeholders (`--batch-size
BATCH_SIZE`) where a command's help has always shown them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from core.errors import OhLoRAError

COUNT, NONNEG, POSITIVE, RATIO, COSINE = "[1, inf)", "[0, inf)", "(0, inf)", "[0, 1]", "[-1, 1]"
DTYPE_CHOICES = ("auto", "fp32", "bf16")
_META_KEYS = {"help", "range", "choices", "flag", "aliases", "kind", "metavar", "required", "default", "parse",
              "positional", "exclusive", "dest"}


# ------------------------------------------------------------------------------------------- field metadata
def flag(default: Any = dataclasses.MISSING, *, help: str = "", range: str | None = None,
         choices: tuple | None = None, flag: str | None = None, aliases: tuple[str, ...] = (),
         kind: str | None = None, metavar: str | None = None, required: bool = False,
         parse: Callable[[str], Any] | None = None, positional: bool = False, exclusive: str | None = None,
         dest: str | None = None) -> Any:
    """A dataclass field carrying its CLI metadata: `lr: float = flag(2e-4, help="peak lr", range=POSITIVE)`.

    `flag` replaces the default `--kebab-name`; `aliases` are deprecated spellings still accepted (with a note);
    `parse` an argparse `type=` of the caller's (e.g. infer.models.check_model_path) where `kind` has none;
    `positional` an argument without dashes; `exclusive` names a mutually exclusive group (required when any
    member says `required`); `dest` the attribute the parsed value lands in (default: prefix + field name)."""
    meta = {"help": help, "range": range, "choices": choices, "flag": flag, "aliases": tuple(aliases),
            "kind": kind, "metavar": metavar, "required": required, "parse": parse, "positional": positional,
            "exclusive": exclusive, "dest": dest}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    m = re.fullmatch(r"\s*([\[(])\s*([-+]?(?:inf|[\d.e+-]+))\s*,\s*([-+]?(?:inf|[\d.e+-]+))\s*([\])])\s*", spec)
    if m is None:
        raise ValueError(f"bad range spec {spec!r} (write e.g. '[1, inf)' or '(0, 1]')")
    return float(m[2]), float(m[3]), m[1] == "[", m[4] == "]"


def range_problem(value: float, spec: str | None) -> str | None:
    """Why `value` is not a finite number in `spec` (an interval string), or None when it is fine."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if spec is None:
        return None
    lo, hi, lo_in, hi_in = _interval(spec)
    if (value < lo or (value == lo and not lo_in)) or (value > hi or (value == hi and not hi_in)):
        if math.isinf(hi):
            return f"must be {'>=' if lo_in else '>'} {lo:g}, got {value}"
        if math.isinf(lo):
            return f"must be {'<=' if hi_in else '<'} {hi:g}, got {value}"
        return f"must be in {spec.strip()}, got {value}"
    return None


def number(kind: type, spec: str | None = None) -> Callable[[str], int | float]:
    """An argparse `type=` for an int or float that must be finite and in `spec`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = range_problem(value, spec)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = kind.__name__
    return parse


# ---------------------------------------------------------------------------------------- paths and devices
def _creatable_under(path: Path) -> None:
    """No existing file among `path`'s parents (a folder cannot be made under a file)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be created under it")
            return


def check_output_dir(text: str) -> str:
    """A folder we may create or replace: not an existing file, and no existing file among its parents."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is a file, not a folder")
    _creatable_under(path)
    return text


def check_output_file(text: str) -> str:
    """A file we may create or replace: not a folder, and no existing file among its parents."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, expected a file")
    _creatable_under(path)
    return text


def check_dir(text: str) -> str:
    path = Path(text)
    if not path.exists() and path.with_name(f".{path.name}.old").is_dir():
        return text  # a folder swap a kill interrupted: core.atomic.recover_dir brings it back on use
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder not found" if not Path(text).exists()
                                         else f"{text} is a file, expected a folder")
    return text


def check_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: file not found" if not Path(text).exists()
                                         else f"{text} is a folder, expected a file")
    return text


def check_path(text: str) -> str:
    """An existing file or folder (a model checkpoint may be either: an HF folder or a .gguf file)."""
    return text if Path(text).is_file() else check_dir(text)


def check_device(text: str) -> str:
    """cpu / cuda / cuda:N / mps, and present here (a CPU-only build refuses cuda with one line)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} is not available here (no CUDA build or no GPU visible); "
                                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text} is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported (use cpu, cuda or cuda:N)")
    return text


_METAVARS = {"output_dir": "DIR", "dir": "DIR", "file": "FILE", "path": "PATH", "output_file": "FILE",
             "device": "DEVICE", int: "N", float: "X", str: None}
KINDS: dict[str, Callable[[str], str]] = {"output_dir": check_output_dir, "output_file": check_output_file,
                                          "dir": check_dir, "file": check_file, "path": check_path,
                                          "device": check_device}


def choose_dtype(name: str | None, device: str | None = None, *, flag: str = "--dtype") -> tuple[str, str | None]:
    """('fp32' | 'bf16', note): 'auto' picks by capability; an explicit bf16 on a CPU that only emulates it is
    kept but noted. Measured on one tiny-to-mid GPT-NeoX forward: emulated bf16 (oneDNN limited to AVX2) runs
    batch forwards 4-7x slower than fp32; native bf16 (AVX-512 BF16 / AMX) 1.2-4x faster for T=64 batches."""
    import torch

    from core.onednn import native_bf16

    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        why = "CUDA with bf16" if fast else "this GPU has no bf16"
    else:
        fast = native_bf16()
        why = ("this CPU runs bf16 natively (AVX-512 BF16/AMX)" if fast else
               "this CPU has no native bf16: oneDNN would emulate it, several times slower than fp32")
    if name in (None, "auto"):
        chosen = "bf16" if fast else "fp32"
        return chosen, f"note: {flag} auto -> {chosen} ({why})"
    if name == "bf16" and not fast and not cuda:
        return name, f"note: {flag} bf16 kept as asked, but {why}; {flag} auto picks fp32 here"
    return name, None


# -------------------------------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.HelpFormatter):
    """Shows `(default: X)` only where there is a real default (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
                and "%(default)" not in text
                and action.option_strings and not isinstance(action, argparse.BooleanOptionalAction)):
            text += " (default: %(default)s)"
        return text


def _first_name(names: str) -> str:
    return names.split("/")[0].strip()


class Parser(argparse.ArgumentParser):
    """argparse with the house conventions: one-line `error: <flag>: <problem>` (exit 2), `--debug`, and
    notes for deprecated aliases."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.deprecated: dict[str, str] = {}  # alias -> flag
        self.add_argument("--debug", action="store_true", help="show a traceback instead of the one-line error")

    def add_alias_note(self, alias: str, canonical: str) -> None:
        self.deprecated[alias] = canonical

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())
        if m := re.match(r"argument ([^:]+): (.*)", message):
            message = f"{_first_name(m[1])}: {m[2]}"
        elif m := re.match(r"the following arguments are required: (.*)", message):
            message = f"{_first_name(m[1].split(',')[0])}: required"
        elif m := re.match(r"unrecognized arguments: (\S+)", message):
            message = f"{m[1]}: unknown argument (see --help)"
        self.exit(2, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        result = super().parse_known_args(args, namespace)
        for token in args:
            name = token.split("=", 1)[0]
            if name in self.deprecated:
                print(f"note: {name} is deprecated; use {self.deprecated[name]}", file=sys.stderr)
        return result


def _field_type(hint: Any) -> tuple[Any, bool]:
    """(base type, is_sequence) of an annotation: `int | None` -> (int, False), `tuple[str, ...]` -> (str, True),
    `list[str] | str` -> (str, True) (a flag takes the list form)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        listed = [a for a in rest if typing.get_origin(a) in (list, tuple)]
        return _field_type(rest[0] if len(rest) == 1 else listed[0]) if len(rest) == 1 or listed else (str, False)
    if origin in (list, tuple):
        inner = typing.get_args(hint)
        return (inner[0] if inner else str), True
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0]), False
    return hint, False


def _dest(f: dataclasses.Field, prefix: str) -> str:
    return f.metadata.get("dest") or prefix + f.name


def add_config_flags(parser: argparse.ArgumentParser, config: type, *, only: tuple[str, ...] | None = None,
                     exclude: tuple[str, ...] = (), overrides: dict[str, dict] | None = None,
                     group: str | None = None, prefix: str = "", argparse_metavars: bool = False) -> list[str]:
    """Add one flag per `flag()` field of the dataclass `config` (dest = `prefix` + the field name; a field
    declared without flag() has none); returns the dests.

    `overrides` ({field: {key: value}}, the keys of `flag()`): a command's own words about another owner's
    field, in practice its default and the help text that states it. `argparse_metavars`: show argparse's own
    placeholders (`--batch-size BATCH_SIZE`) instead of the house's N / X / DIR, for commands whose help has
    always shown them."""
    hints = typing.get_type_hints(config)
    target = parser.add_argument_group(group) if group else parser
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    added = []
    for f in dataclasses.fields(config):
        if f.name in exclude or (only is not None and f.name not in only) or not f.init \
                or not any(k in f.metadata for k in _META_KEYS):   # a field without flag() is no flag
            continue
        meta = {**{k: v for k, v in f.metadata.items() if k in _META_KEYS}, **(overrides or {}).get(f.name, {})}
        unknown = set(meta) - _META_KEYS
        if unknown:
            raise TypeError(f"{config.__name__}.{f.name}: unknown CLI metadata {sorted(unknown)}")
        if "default" in meta:
            default = meta["default"]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        base, sequence = _field_type(hints[f.name])
        dest = _dest(f, prefix)  # (not overridable: config_from_args maps it back)
        kw: dict[str, Any] = {"default": default, "help": meta.get("help") or ""}
        if meta.get("positional"):
            names = [dest]
        else:
            names = [meta.get("flag") or "--" + dest.replace("_", "-"), *meta.get("aliases", ())]
            kw["dest"] = dest
        if meta.get("required") and not meta.get("exclusive"):
            kw["required"] = True
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            if meta.get("parse"):
                kw["type"] = meta["parse"]
            elif meta.get("kind"):
                kw["type"] = KINDS[meta["kind"]]
            elif base in (int, float):
                kw["type"] = number(base, meta.get("range"))
            else:
                kw["type"] = str
            choices = meta.get("choices")
            if choices is None and typing.get_origin(hints[f.name]) is typing.Literal:
                choices = typing.get_args(hints[f.name])
            if choices is not None:
                kw["choices"] = tuple(choices)
            if sequence:
                kw["nargs"] = "+"
            metavar = meta.get("metavar") or (None if argparse_metavars else
                                              _METAVARS.get(meta.get("kind") or base))
            if metavar is not None:
                kw["metavar"] = metavar
        where = target
        if meta.get("exclusive"):
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group()
            where = exclusive[meta["exclusive"]]
            where.required = where.required or bool(meta.get("required"))
        where.add_argument(*names, **kw)
        if isinstance(parser, Parser):
            for alias in names[1:]:
                parser.add_alias_note(alias, names[0])
        added.append(dest)
    return added


def config_from_args(config: type, args: argparse.Namespace, *, prefix: str = "", **changes: Any) -> Any:
    """The dataclass `config` from the parsed flags (fields without flag() keep their defaults, whatever else
    the namespace holds); `prefix` as given to add_config_flags."""
    hints = typing.get_type_hints(config)
    values = {}
    for f in dataclasses.fields(config):
        if f.init and any(k in f.metadata for k in _META_KEYS) and hasattr(args, _dest(f, prefix)):
            value = getattr(args, _dest(f, prefix))
            if isinstance(value, list) and typing.get_origin(_strip_optional(hints[f.name])) is tuple:
                value = tuple(value)
            values[f.name] = value
    values.update(changes)
    return config(**values)


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def check_config(config: Any) -> None:
    """Validate a dataclass instance against its fields' `range` / `choices` (for `__post_init__`): one
    ValueError naming the class and field. The CLI checked the same ranges already at parse time."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            problem = range_problem(value, f.metadata.get("range"))
            if problem:
                raise ValueError(f"{type(config).__name__}: {f.name} {problem}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{type(config).__name__}: {f.name} must be one of {', '.join(map(str, choices))}, "
                             f"got {value!r}")


# ---------------------------------------------------------------------------------------------- the runner
def one_line(text: str) -> str:
    return " ".join(str(text).split())


def os_error_line(e: OSError) -> str:
    """`[Errno 21] Is a directory: 'x'` -> `x: is a directory`; our own `FileNotFoundError("x: ...")` as is."""
    if e.filename is None:
        return one_line(str(e)) or type(e).__name__
    what = e.strerror or type(e).__name__
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return one_line(f"{where}: {what[:1].lower()}{what[1:]}")


def run_cli(main: Callable | None = None, *, errors: tuple[type[BaseException], ...] = ()) -> Callable:
    """Wrap a CLI `main(argv)` so it returns an exit code: 0, argparse's 2, or `exit_code` (2 unless the class
    says otherwise) with one line `error: ...` for an OhLoRAError / OSError (or one of `errors`, for classes
    not yet derived from OhLoRAError); 130 on Ctrl-C. `--debug` in argv re-raises instead.

        @run_cli                          or      @run_cli(errors=(GGUFError,))
        def main(argv=None) -> int: ..."""
    caught = (OhLoRAError, *errors)

    def decorate(main: Callable) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in argv
            try:
                code = main(argv)
            except SystemExit as e:  # argparse (bad flag, --help) and explicit exits
                if e.code is None or isinstance(e.code, int):
                    return e.code or 0
                print(f"error: {one_line(e.code)}", file=sys.stderr)
                return 1
            except caught as e:
                if debug:
                    raise
                print(f"error: {one_line(e)}", file=sys.stderr)
                return int(getattr(e, "exit_code", 2))
            except OSError as e:
                if debug:
                    raise
                print(f"error: {os_error_line(e)}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
            return 0 if code is None else int(code)
        return wrapper

    return decorate(main) if main is not None else decorate
