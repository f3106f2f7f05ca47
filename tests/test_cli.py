"""core.cli: flags from dataclass configs, parse-time number checks, the one-line error convention."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from core import cli, onednn
from core.cli import COUNT, POSITIVE, RATIO, Parser, add_config_flags, config_from_args, flag, run_cli
from core.errors import OhLoRAError


@dataclass
class Demo:
    epochs: int = flag(3, help="passes", range=COUNT)
    lr: float = flag(1e-3, help="peak lr", range=POSITIVE)
    warmup_ratio: float = flag(0.1, range=RATIO)
    output_dir: str = flag("runs/x", kind="output_dir", aliases=("--output",))
    targets: tuple[str, ...] = flag(("a",), help="names")
    bucket: bool = flag(True)
    verbose: bool = flag(False)
    limit: int | None = flag(None, range=COUNT)


def parse(argv: list[str]) -> Demo:
    p = Parser(prog="demo")
    add_config_flags(p, Demo)
    return config_from_args(Demo, p.parse_args(argv))


def test_flags_types_and_defaults_come_from_the_dataclass(tmp_path):
    assert parse([]) == Demo()
    got = parse(["--epochs", "5", "--lr", "2e-4", "--targets", "b", "c", "--no-bucket", "--verbose",
                 "--limit", "7", "--output-dir", str(tmp_path / "o")])
    assert got == Demo(epochs=5, lr=2e-4, targets=("b", "c"), bucket=False, verbose=True, limit=7,
                       output_dir=str(tmp_path / "o"))


@pytest.mark.parametrize("argv, line", [
    (["--epochs", "0"], "error: --epochs: must be >= 1, got 0"),
    (["--epochs", "2.5"], "error: --epochs: expected an integer, got '2.5'"),
    (["--lr", "0"], "error: --lr: must be > 0, got 0.0"),
    (["--lr", "nan"], "error: --lr: must be a finite number, got nan"),
    (["--lr=-inf"], "error: --lr: must be a finite number, got -inf"),
    (["--warmup-ratio", "1.01"], "error: --warmup-ratio: must be in [0, 1], got 1.01"),
    (["--limit"], "error: --limit: expected one argument"),
    (["--nope"], "error: --nope: unknown argument (see --help)"),
])
def test_bad_numbers_are_one_line_exit_2(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_deprecated_alias_works_with_a_note(tmp_path, capsys):
    assert parse(["--output", str(tmp_path)]).output_dir == str(tmp_path)
    assert capsys.readouterr().err == "note: --output is deprecated; use --output-dir\n"


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        parse(["--output-dir", str(tmp_path / "f" / "sub")])
    assert capsys.readouterr().err == f"error: --output-dir: {tmp_path / 'f'} is a file, so " \
                                      f"{tmp_path / 'f' / 'sub'} cannot be created under it\n"


class MyError(OhLoRAError):
    pass


class Diverged(OhLoRAError):
    exit_code = 1


def test_run_cli_maps_only_our_errors_and_os_errors(tmp_path, capsys):
    def raising(exc):
        @run_cli
        def main(argv=None):
            raise exc
        return main

    assert raising(MyError("x.csv: bad\nsecond line"))([]) == 2
    assert capsys.readouterr().err == "error: x.csv: bad second line\n"
    assert raising(Diverged("loss is nan at step 3"))([]) == 1
    assert raising(IsADirectoryError(21, "Is a directory", str(tmp_path)))([]) == 2
    assert capsys.readouterr().err.endswith(f"error: {tmp_path}: is a directory\n")
    with pytest.raises(ValueError):           # a bare ValueError is a bug: its traceback stays
        raising(ValueError("bug"))([])
    with pytest.raises(MyError):              # --debug asks for the traceback
        raising(MyError("x"))(["--debug"])


def test_run_cli_returns_argparse_exit_codes():
    @run_cli
    def main(argv=None):
        Parser(prog="demo").parse_args(argv)
        return 0
    assert main([]) == 0 and main(["--help"]) == 0 and main(["--bad"]) == 2


def test_check_config_names_the_field():
    from infer.sampler import SamplingConfig
    with pytest.raises(ValueError, match="SamplingConfig: temperature must be a finite number, got nan"):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"SamplingConfig: top_p must be in \(0, 1\], got 0"):
        SamplingConfig(top_p=0)


def test_dtype_auto_is_chosen_by_capability(monkeypatch):
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    chosen, note = cli.choose_dtype("auto", "cpu")
    assert chosen == "fp32" and "no native bf16" in note and note.count("\n") == 0
    assert cli.choose_dtype("bf16", "cpu")[0] == "bf16" and "auto picks fp32" in cli.choose_dtype("bf16", "cpu")[1]
    assert cli.choose_dtype("fp32", "cpu") == ("fp32", None)
    monkeypatch.setattr(onednn, "native_bf16", lambda: True)
    chosen, note = cli.choose_dtype("auto", "cpu")
    assert chosen == "bf16" and "natively" in note
    assert cli.choose_dtype("bf16", "cpu") == ("bf16", None)
