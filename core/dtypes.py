"""dtype names as flags and config files spell them."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling of HF config.json's `torch_dtype` / `dtype`)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' / 'bfloat16' / 'fp32' / ... -> torch dtype; ValueError naming the choices otherwise."""
    try:
        return DTYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {name!r} (choose from fp32, bf16, fp16)") from None
