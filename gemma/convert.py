"""Convert a Gemma-2 / Gemma-3 GGUF file into a Hugging Face model folder.

    python -m gemma.convert FILE.gguf OUT_DIR [--dtype fp32|bf16]

Writes config.json, model.safetensors (every tensor dequantised; fp32, the default, holds the GGUF's values
exactly, bf16 rounds them), tokenizer.json and tokenizer_config.json. transformers'
AutoModelForCausalLM / AutoTokenizer and our `gemma.load_model` read the folder. The folder appears only when
complete (written beside it, then renamed). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.cli import Parser, add_config_flags, config_from_args, flag, run_cli

from .gguf_io import GGUFFile
from .load import load_gguf, save_pretrained
from .tokenizer import tokenizer_files, tokenizer_from_gguf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def convert(gguf: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """GGUF file -> HF folder (weights, config, tokenizer); returns the folder."""
    f = GGUFFile.open(gguf)  # opened once: the vocabulary is parsed for the model's config and the tokenizer
    files = tokenizer_files(tokenizer_from_gguf(f), f)
    model = load_gguf(f, dtype)
    return save_pretrained(model, out_dir, extra_files=files)


@dataclass
class ConvertOptions:
    """`python -m gemma.convert` arguments (core.cli)."""
    gguf: str = flag(None, positional=True, kind="file", metavar="FILE.gguf", help="a Gemma-2 / Gemma-3 .gguf file")
    out_dir: str = flag(None, positional=True, kind="output_dir", metavar="OUT_DIR",
                        help="HF folder to write (files replaced atomically if it exists)")
    dtype: str = flag("fp32", choices=tuple(sorted(DTYPES)),
                      help="weights dtype (fp32: the dequantised values exactly)")


@run_cli  # GGUFError / ConfigError (OhLoRAError) and OSError -> `error: <file>: <problem>`, exit 2
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m gemma.convert", description=__doc__.split("\n\n")[0])
    add_config_flags(ap, ConvertOptions, argparse_metavars=True)
    args = config_from_args(ConvertOptions, ap.parse_args(argv))
    t0 = time.perf_counter()
    folder = convert(args.gguf, args.out_dir, DTYPES[args.dtype])
    print(f"wrote {folder} ({args.dtype}) from {args.gguf} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
