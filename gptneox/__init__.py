"""Hand-written GPT-NeoX (Polyglot-Ko) in plain PyTorch: config, model with KV cache, HF-format load/save, and
FAMILY, its entry in the model-family registry (core/registry.py). Its tokenizer is core.tokenizer's (any HF
folder's). Imports only core/ of ours and nothing from transformers."""
from .config import ConfigError, GPTNeoXConfig
from .load import CheckpointError, load_model, save_pretrained
from .model import GPTNeoXForCausalLM, GPTNeoXModel, KVCache
from .family import FAMILY

__all__ = ["GPTNeoXConfig", "ConfigError", "GPTNeoXForCausalLM", "GPTNeoXModel", "KVCache", "load_model",
           "save_pretrained", "CheckpointError", "FAMILY"]
