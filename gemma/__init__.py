"""Hand-written Gemma-2 / Gemma-3 (text) in plain PyTorch: config, model with KV cache, loading from HF folders
and GGUF files, the tokenizer from GGUF metadata, writing GGUF files (gguf_write.py), `python -m gemma.convert`,
and FAMILY, its entry in the model-family registry (core/registry.py). Imports only core/ of ours and nothing
from transformers. Gemma weights are under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)."""
from .config import ConfigError, GemmaConfig
from .gguf_io import GGUFError, GGUFFile, default_gemma_gguf
from .gguf_write import write_gguf
from .load import CheckpointError, load_gguf, load_model, load_pretrained, save_pretrained
from .model import GemmaForCausalLM, GemmaModel, KVCache
from .tokenizer import TokenizerError, tokenizer_from_folder, tokenizer_from_gguf
from .family import FAMILY

__all__ = ["GemmaConfig", "ConfigError", "GemmaForCausalLM", "GemmaModel", "KVCache", "load_model", "load_gguf",
           "load_pretrained", "save_pretrained", "CheckpointError", "GGUFError", "GGUFFile", "default_gemma_gguf",
           "tokenizer_from_gguf", "tokenizer_from_folder", "TokenizerError", "write_gguf", "FAMILY"]
