"""Our GPT-NeoX vs transformers.GPTNeoXForCausalLM: logits on padded batches, both config dialects, KV cache."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptneox import GPTNeoXConfig, GPTNeoXForCausalLM, KVCache, load_model
from neox_fixtures import save_tiny_hf_neox

TOL = 1e-4


def padded_batch(vocab: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows of 13 tokens: left-padded, right-padded, unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[1, 9:] = 0   # right padding
    ids[mask == 0] = 1
    return ids, mask


def hf_logits(folder, ids, mask) -> torch.Tensor:
    from transformers import GPTNeoXForCausalLM as HF

    hf = HF.from_pretrained(folder, dtype=torch.float32).eval()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the same positions ours derives from the mask
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


CONFIGS = {
    "rotary0.25-parallel-untied": dict(rotary_pct=0.25),
    "rotary1.0-sequential-untied": dict(rotary_pct=1.0, use_parallel_residual=False),
    "rotary0.25-sequential-tied": dict(rotary_pct=0.25, use_parallel_residual=False, tie_word_embeddings=True),
    "rotary1.0-parallel-tied-sharded": dict(rotary_pct=1.0, tie_word_embeddings=True, max_shard_size="60KB"),
    "rotary0.5-parallel-sharded": dict(rotary_pct=0.5, num_hidden_layers=3, max_shard_size="40KB", seed=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_hf_on_padded_batch(tmp_path, name):
    kwargs = CONFIGS[name]
    folder = save_tiny_hf_neox(tmp_path / "m", **kwargs)
    if "max_shard_size" in kwargs:
        assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    ours = load_model(folder)
    assert ours.config.rotary_pct == kwargs["rotary_pct"]
    assert ours.config.use_parallel_residual == kwargs.get("use_parallel_residual", True)
    assert ours.config.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
    if ours.config.tie_word_embeddings:
        assert ours.embed_out.weight is ours.gpt_neox.embed_in.weight
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = ours(ids, mask)
    ref = hf_logits(folder, ids, mask)
    real = mask.bool()
    assert logits.shape == ref.shape == (3, 13, 320)
    assert torch.isfinite(logits).all()  # left-padding query rows see no real key: must not be NaN
    assert (logits - ref)[real].abs().max().item() <= TOL
    assert ref[real].abs().max().item() > 0.1  # the comparison is not between two near-zero tensors


def legacy_polyglot_folder(tmp_path):
    """Tiny weights from transformers, rewritten like the real polyglot-ko-1.3b download: its exact legacy
    config keys, fp16 tensors in 3 shards + index, plus the old non-weight buffers."""
    src = save_tiny_hf_neox(tmp_path / "src", rotary_pct=0.5, num_hidden_layers=3, seed=7)
    state = {k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()}
    for i in range(3):  # buffers transformers 4.2x wrote into checkpoints
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 128, 128, dtype=torch.bool))
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    folder = tmp_path / "polyglot-like"
    folder.mkdir()
    keys = sorted(state)
    parts = [keys[0::3], keys[1::3], keys[2::3]]
    weight_map = {}
    for n, part in enumerate(parts, 1):
        name = f"model-{n:05d}-of-00003.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    legacy = {  # exactly the keys of the real download's config.json, tiny sizes
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 128, "model_type": "gpt_neox", "num_attention_heads": 4,
        "num_hidden_layers": 3, "rotary_emb_base": 10000, "rotary_pct": 0.5, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": 320}
    (folder / "config.json").write_text(json.dumps(legacy, indent=2))
    return folder


def test_legacy_polyglot_config_and_layout_equal_hf(tmp_path):
    folder = legacy_polyglot_folder(tmp_path)
    ours = load_model(folder)
    assert ours.config.use_parallel_residual is True and ours.config.rotary_ndims == 8
    assert ours.dtype == torch.float32
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        logits = ours(ids, mask)
    ref = hf_logits(folder, ids, mask)
    assert (logits - ref)[mask.bool()].abs().max().item() <= TOL


def test_both_dialects_give_the_same_config():
    legacy = {"model_type": "gpt_neox", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.5, "rotary_emb_base": 500}
    new = {k: v for k, v in legacy.items() if not k.startswith("rotary")}
    new["rope_parameters"] = {"partial_rotary_factor": 0.5, "rope_theta": 500.0, "rope_type": "default"}
    a, b = GPTNeoXConfig.from_dict(legacy), GPTNeoXConfig.from_dict(new)
    assert a == b and a.rotary_ndims == 8 and a.rotary_emb_base == 500.0 and a.use_parallel_residual is True


def decode_step_by_step(model, ids, mask, first: int, cache: KVCache, step: int = 1) -> torch.Tensor:
    outs = [model(ids[:, :first], mask[:, :first], cache=cache)]
    for t in range(first, ids.shape[1], step):
        outs.append(model(ids[:, t:t + step], mask[:, :t + step], cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, padding):
    model = load_model(save_tiny_hf_neox(tmp_path / "m", rotary_pct=0.5, use_parallel_residual=False))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :6] = 0
    with torch.no_grad():
        full = model(ids, mask)
        one_by_one = decode_step_by_step(model, ids, mask, first=8, cache=model.new_cache())
        cache = KVCache(model.config.num_hidden_layers, chunk=4)  # forces the buffers to grow several times
        chunked = decode_step_by_step(model, ids, mask, first=5, cache=cache, step=3)
    real = mask.bool()
    assert cache.length == 14 and cache.keys[0].shape[2] == 16
    assert (one_by_one - full)[real].abs().max().item() <= TOL
    assert (chunked - full)[real].abs().max().item() <= TOL
    assert torch.isfinite(one_by_one).all()


def test_kv_cache_without_mask_uses_cache_offset_positions(tmp_path):
    model = load_model(save_tiny_hf_neox(tmp_path / "m"))
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= TOL


def test_hidden_states_api_and_cache_select(tmp_path):
    model = load_model(save_tiny_hf_neox(tmp_path / "m"))
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = model.gpt_neox(ids, mask)
        logits = model(ids, mask)
        assert hidden.shape == (3, 13, 64)
        assert (model.embed_out(hidden) - logits).abs().max().item() == 0.0
        cache = model.new_cache()
        model(ids[:, :12], mask[:, :12], cache=cache)
        cache.select(torch.tensor([2, 0]))  # keep rows 2 and 0, in that order
        last = model(ids[[2, 0], 12:], mask[[2, 0]], cache=cache)
    assert (last - logits[[2, 0], 12:]).abs().max().item() <= TOL


def test_bf16_and_fp16_forward_close_to_fp32(tmp_path):
    folder = save_tiny_hf_neox(tmp_path / "m", rotary_pct=0.5)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ref = load_model(folder)(ids, mask)
        for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
            model = load_model(folder, dtype=dtype)
            assert all(p.dtype == dtype for p in model.parameters())
            out = model(ids, mask)
            assert out.dtype == dtype and torch.isfinite(out).all()
            err = (out.float() - ref)[real].abs().max().item()
            assert err <= tol * ref[real].abs().max().item(), (dtype, err)


def test_training_backward_and_gradient_checkpointing_match(tmp_path):
    folder = save_tiny_hf_neox(tmp_path / "m")
    ids, mask = padded_batch()
    grads = []
    for ckpt in (False, True):
        model = load_model(folder).train()
        model.gpt_neox.gradient_checkpointing = ckpt
        logits = model(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
        loss.backward()
        grads.append(model.gpt_neox.layers[0].attention.query_key_value.weight.grad.clone())
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6


def test_polyglot_preset_and_parameter_count_match_hf_on_meta():
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM as HF

    config = GPTNeoXConfig.polyglot_ko_1_3b()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, config.max_position_embeddings) == (2048, 24, 16, 8192, 30080, 2048)
    assert (config.rotary_pct, config.rotary_emb_base, config.layer_norm_eps) == (0.5, 10000.0, 1e-5)
    assert config.use_parallel_residual and not config.tie_word_embeddings and config.hidden_act == "gelu"
    assert config.head_dim == 128 and config.rotary_ndims == 64
    with torch.device("meta"):
        ours = GPTNeoXForCausalLM(config)
        hf = HF(HFConfig(**config.to_hf_dict()))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert ours.num_parameters() == hf_count == 1_331_810_304
    assert all(p.is_meta for p in ours.parameters())
    hf_names = {k.replace("lm_head.", "embed_out.") for k in hf.state_dict()}
    assert set(ours.state_dict()) == hf_names
