"""LoRA from scratch: `LoRALinear`, injection by module name, merging, and PEFT-format adapter files.

Walk-through: docs/lora.md.
"""
from .config import GPT_NEOX_TARGETS, LoRAConfig
from .inject import LoRAReport, inject_lora, lora_layers, merge_lora
from .io import AdapterError, adapter_base_model, load_adapter, read_adapter_config, save_adapter
from .layer import LoRALinear

__all__ = ["GPT_NEOX_TARGETS", "LoRAConfig", "LoRALinear", "LoRAReport", "inject_lora", "lora_layers",
           "merge_lora", "AdapterError", "adapter_base_model", "load_adapter", "read_adapter_config", "save_adapter"]
