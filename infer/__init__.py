"""Inference on any registered model family: what training's eval samples and the apps (chat, export, the
coming server) share, without importing train/.

    models        inspect_model -> ModelSource (read once), load_causal_lm / load_base_model / load_tokenizer
                  through the family registry (core/registry.py), match_checkpoint for sharded loaders
    sampler       generate / generate_batch: KV cache, greedy / temperature / top-k / top-p, stop strings
    prefix_cache  the batch-1 KV cache kept between chat turns

Imports core/ (the registry, the tokenizer, the KV cache) and nothing else of ours.
"""
