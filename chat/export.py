"""Export a fine-tuned model where users run models: the adapter merged into its base, as an HF folder or GGUF.

    python -m chat.export --adapter DIR --hf OUT_DIR [--dtype fp32|bf16]
    python -m chat.export --adapter DIR --gguf OUT.gguf [--type f16|bf16|q8_0]

The base defaults to the adapter's own record of it (adapter_config.json `base_model_name_or_path`, which
`train.sft` writes: a .gguf file or an HF folder); `--model PATH` overrides it. The model is loaded in fp32
(infer.models.load_causal_lm), the adapter loaded (lora.load_adapter) and merged (lora.merge_lora), then:

* `--hf`: config.json + model.safetensors + the tokenizer files (from the base folder, or rebuilt from the
  GGUF's metadata): transformers' AutoModelForCausalLM / AutoTokenizer and our loaders read it. Any family.
* `--gguf`: a llama.cpp / Ollama file by the family's GGUF writer (Gemma: gemma/gguf_write.py), 2-D tensors
  F16, BF16 or Q8_0, norms F32, the tokenizer metadata carried over from the base GGUF (or rebuilt from the
  base folder's tokenizer.json). Families without a writer (GPT-NeoX) export with --hf, then llama.cpp's
  convert_hf_to_gguf.py.

Everything family-specific comes from the family registry (core/registry.py).

Outputs are written atomically (complete or absent). Bad input: one line naming the flag or file, exit code 2.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from core.atomic import atomic_write_dir
from core.cli import Parser, check_dir, check_output_dir, check_output_file, run_cli
from core.errors import OhLoRAError
from core.registry import families
from infer.models import ModelSource, check_model_path, inspect_model, load_base_model, load_causal_lm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GGUF_TYPES = ("f16", "bf16", "q8_0")
# what an HF folder's tokenizer is made of (whichever the base has are copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


class ExportError(OhLoRAError):
    """An export we cannot do (the message names the flag or file and the problem)."""


def base_path(adapter: str | Path, model: str | None) -> Path:
    """--model, or the base the adapter records (adapter_config.json base_model_name_or_path)."""
    if model:
        return Path(model)
    from core.jsonio import read_json
    from lora.io import CONFIG_NAME, AdapterError

    config_path = Path(adapter) / CONFIG_NAME
    if not config_path.is_file():
        raise ExportError(f"{config_path}: not found (is --adapter {adapter} an adapter folder?)")
    recorded = read_json(config_path, AdapterError).get("base_model_name_or_path")
    if not recorded:
        raise ExportError(f"{config_path}: no base_model_name_or_path recorded; pass --model PATH")
    if not Path(recorded).exists():
        raise ExportError(f"{config_path}: base model {recorded} (base_model_name_or_path) not found; "
                          f"pass --model PATH")
    return Path(recorded)


def merged_model(adapter: str | Path, source: ModelSource):
    """The merged model in fp32, eval: the base (an infer.models ModelSource) loaded, the adapter loaded onto
    it and merged in. A GGUF base's file stays open in `source.gguf` for the export's tokenizer metadata."""
    from lora import load_adapter, merge_lora

    if source.format == "gguf":  # the tokenizer is the GGUF's own metadata: nothing to check it against
        model = load_base_model(source, torch.float32)
    else:
        model, _ = load_causal_lm(source, torch.float32)  # checks the tokenizer fits the model, too
    load_adapter(model, adapter)
    return merge_lora(model).eval()


def check_gguf_family(source: ModelSource) -> None:
    if source.family.export_gguf is None:
        writers = " or ".join(f.title for f in families() if f.export_gguf is not None) or "no"
        raise ExportError(f"--gguf: GGUF export supports {writers} bases only, and {source.path} is "
                          f"{source.family.title}; export it with --hf OUT_DIR and convert that folder with "
                          f"llama.cpp's convert_hf_to_gguf.py")


def export_hf(model, source: ModelSource, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merged weights + config + tokenizer files as one new HF folder (swapped in whole)."""
    model = model.to(dtype)

    def write(tmp: Path) -> None:
        source.family.save_hf(model, tmp)  # each family writes its own config.json and tied-weight convention
        if source.format == "gguf":  # the tokenizer lives in the GGUF's metadata: rebuilt as the family says
            for name, text in source.family.gguf_tokenizer_files(source.gguf).items():
                (tmp / name).write_text(text, encoding="utf-8")
        else:
            for name in TOKENIZER_FILES:
                if (source.path / name).is_file():
                    shutil.copyfile(source.path / name, tmp / name)

    return atomic_write_dir(out_dir, write)


def export_gguf(model, source: ModelSource, out: str | Path, kind: str = "f16") -> Path:
    """Merged model as a GGUF file with 2-D tensors in `kind` (f16 | bf16 | q8_0), by the family's writer."""
    check_gguf_family(source)
    return source.family.export_gguf(model, out, kind, source.path,
                                     source.gguf if source.format == "gguf" else None)


@run_cli  # ExportError / AdapterError / ModelPathError / GGUFError (OhLoRAError) and OSError -> one line, exit 2
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m chat.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", type=check_dir, required=True, metavar="DIR",
                    help="the LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--model", type=check_model_path, default=None, metavar="PATH",
                    help="base model: a .gguf file or an HF folder (default: the adapter's base_model_name_or_path)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--hf", type=check_output_dir, metavar="OUT_DIR", help="write an HF model folder")
    out.add_argument("--gguf", type=check_output_file, metavar="OUT.gguf", help="write a GGUF file (Gemma only)")
    ap.add_argument("--type", choices=GGUF_TYPES, default=None,
                    help="with --gguf: tensor type of the 2-D weights, norms stay F32 (default: f16)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="with --hf: weights dtype (default: fp32)")
    args = ap.parse_args(argv)
    if args.hf and args.type:
        ap.error("--type: sets the GGUF tensor type; with --hf use --dtype fp32|bf16")
    if args.gguf and args.dtype:
        ap.error("--dtype: sets the HF folder's weights dtype; with --gguf use --type f16|bf16|q8_0")
    args.type, args.dtype = args.type or "f16", args.dtype or "fp32"
    base = base_path(args.adapter, args.model)
    source = inspect_model(base)
    if args.gguf:
        check_gguf_family(source)  # before minutes of loading
    t0 = time.perf_counter()
    model = merged_model(args.adapter, source)
    if args.gguf:
        path = export_gguf(model, source, args.gguf, args.type)
        what = f"GGUF, {args.type}"
    else:
        path = export_hf(model, source, args.hf, DTYPES[args.dtype])
        what = f"HF folder, {args.dtype}"
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    print(f"wrote {path} ({what}, {size / 1e6:.1f} MB): {base} + {args.adapter} merged, "
          f"in {time.perf_counter() - t0:.1f} s")
    if source.family.derivative_notice:
        print(source.family.derivative_notice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
