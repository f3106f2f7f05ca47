"""The one shared leaf under every package: pieces that two or more packages need, written once.

    atomic          temp-name-then-rename writes of files and folders (+ crash recovery of folder swaps)
    safetensors_io  plain-read safetensors files, model-folder weight files, the strict key/shape check
    registry        the model-family registry: each family package exports one `Family`; the layers above
                    look families up here and never import one
    tokenizer       the tokenizer wrapper every family shares (HF folders; Gemma builds it from a GGUF)
    gguf_header     a GGUF file's magic and general.architecture, without parsing the file
    kv_cache        the preallocated per-layer key/value cache for incremental decoding (families fill it)
    rotary          rotary position tables (with HF's rope scalings) and rotate-half application
    masks           boolean SDPA masks for causal / padded / sliding-window attention
    dtypes          dtype names for flags and config files
    onednn          the oneDNN pre-packed linear (CPU inference) and its per-dtype availability check
    errors          OhLoRAError, the base of every package's own error class (what CLIs print in one line)
    cli             one argparse vocabulary from dataclass configs and the `error: <flag or file>: <problem>` exit 2

Imports nothing of ours (a test checks), so any package may import it; the registry imports the built-in
family packages by name on first lookup (core.registry.BUILTIN_FAMILIES).
"""
