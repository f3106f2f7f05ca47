"""Hand-written GPT-NeoX (Polyglot-Ko) in plain PyTorch: config, model with KV cache, HF-format load/save,
tokenizer. Imports nothing from the rest of Oh-LoRA and nothing from transformers."""
from .config import ConfigError, GPTNeoXConfig
from .load import CheckpointError, load_model, save_pretrained
from .model import GPTNeoXForCausalLM, GPTNeoXModel, KVCache
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["GPTNeoXConfig", "ConfigError", "GPTNeoXForCausalLM", "GPTNeoXModel", "KVCache", "load_model",
           "save_pretrained", "CheckpointError", "Tokenizer", "TokenizerError"]
