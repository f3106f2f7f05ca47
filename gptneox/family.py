"""GPT-NeoX's entry in the model-family registry (core/registry.py): what loading, LoRA, FSDP and export use."""
from core.registry import Family

from .config import GPTNeoXConfig
from .load import IGNORED_KEY, KEY_ALIASES, load_model, save_pretrained
from .model import GPTNeoXForCausalLM

FAMILY = Family(
    name="gptneox", title="GPT-NeoX", model_types=("gpt_neox",),
    config_class=GPTNeoXConfig, model_class=GPTNeoXForCausalLM,
    load_hf=load_model, save_hf=save_pretrained,
    lora_targets=GPTNeoXForCausalLM.LORA_TARGETS,
    key_rules=dict(aliases=KEY_ALIASES, ignored=IGNORED_KEY),
)
