"""Loading rules (errors name the tensor/key/file), save_pretrained round trips through transformers, configs."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.safetensors_io import parse_size
from gptneox import CheckpointError, ConfigError, GPTNeoXConfig, GPTNeoXForCausalLM, load_model, save_pretrained
from neox_fixtures import save_tiny_hf_neox


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_hf_neox(tmp_path_factory.mktemp("tiny") / "m", rotary_pct=0.5)


def copy_with_state(src, dst, edit):
    """Copy a single-file tiny model folder, applying edit(state_dict) to the weights."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("tied,shard", [(False, None), (True, None), (False, "30KB")])
def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, tied, shard):
    from transformers import GPTNeoXForCausalLM as HF

    model = load_model(save_tiny_hf_neox(tmp_path / "src", tie_word_embeddings=tied, rotary_pct=1.0,
                                         use_parallel_residual=tied))
    out = tmp_path / "saved"
    save_pretrained(model, out, **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in out.iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
    else:
        assert files == ["config.json", "model.safetensors"]
    written = json.loads((out / "config.json").read_text())
    assert written["use_parallel_residual"] == tied and written["rotary_pct"] == 1.0
    assert "rotary_emb_base" in written and "rope_parameters" not in written  # the legacy dialect, spelled out
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    hf = HF.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.use_parallel_residual == tied
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-5
        again = load_model(out)
        assert (again(ids) - model(ids)).abs().max().item() == 0.0
    if tied:
        assert "embed_out.weight" not in load_file(str(out / "model.safetensors"))


def test_save_pretrained_into_existing_folder_replaces_stale_shards(tmp_path, tiny):
    model = load_model(tiny)
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_size="30KB")
    (out / "tokenizer.json").write_text("{}")  # other files are left alone
    save_pretrained(model, out)  # now small enough for one file
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    assert (load_model(out).embed_out.weight == model.embed_out.weight).all()


def test_save_pretrained_refuses_adapter_parameters(tmp_path, tiny):
    model = load_model(tiny)
    model.gpt_neox.layers[0].attention.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="layers.0.attention.extra.weight"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_removed_tensor_is_named(tmp_path, tiny):
    key = "gpt_neox.layers.1.mlp.dense_h_to_4h.bias"
    folder = copy_with_state(tiny, tmp_path / "bad", lambda s: s.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert key in str(e.value) and "missing" in str(e.value) and str(folder) in str(e.value)


def test_reshaped_tensor_is_named(tmp_path, tiny):
    key = "gpt_neox.layers.0.attention.query_key_value.weight"
    folder = copy_with_state(tiny, tmp_path / "bad", lambda s: s.__setitem__(key, s[key].reshape(96, 128)))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert key in str(e.value) and "(96, 128)" in str(e.value) and "(192, 64)" in str(e.value)


def test_unexpected_tensor_is_named_but_old_buffers_are_ignored(tmp_path, tiny):
    def add(state):
        state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
        state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        state["gpt_neox.rotary_emb.inv_freq"] = torch.ones(4)
    ok = load_model(copy_with_state(tiny, tmp_path / "ok", add))
    assert (ok.embed_out.weight == load_model(tiny).embed_out.weight).all()
    bad = copy_with_state(tiny, tmp_path / "bad", lambda s: s.__setitem__("gpt_neox.layers.0.mlp.gate.weight",
                                                                          torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected: gpt_neox\.layers\.0\.mlp\.gate\.weight"):
        load_model(bad)


def test_pickle_only_folder_needs_safetensors(tmp_path, tiny):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tiny / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors is required"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_shard_listed_in_index_but_absent(tmp_path):
    folder = save_tiny_hf_neox(tmp_path / "m", max_shard_size="40KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(folder)


def test_load_casts_and_owns_its_memory(tmp_path, tiny):
    model = load_model(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = load_model(tiny)
    w = fp32.gpt_neox.layers[0].mlp.dense_4h_to_h.weight
    with torch.no_grad():
        w.add_(1.0)  # must not write through to (or depend on) the mmapped file
    assert (load_model(tiny).gpt_neox.layers[0].mlp.dense_4h_to_h.weight + 1.0 == w).all()
    assert not fp32.training and all(p.requires_grad for p in fp32.parameters())


# ---- config.json handling --------------------------------------------------------------------------------------
BASE = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 320, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def write_config(tmp_path, **changes):
    d = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"architectures": ["LlamaForCausalLM"]}, "architecture 'LlamaForCausalLM'"),
    ({"hidden_act": "swish_glu"}, "hidden_act 'swish_glu'"),
    ({"num_attention_heads": 5}, "not divisible"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
    ({"rotary_pct": 0.25, "rope_parameters": {"partial_rotary_factor": 0.5}}, "disagrees"),
])
def test_bad_config_names_key_and_file(tmp_path, changes, needle):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        GPTNeoXConfig.from_json(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_config_defaults_and_round_trip(tmp_path):
    c = GPTNeoXConfig.from_json(write_config(tmp_path))
    assert (c.rotary_pct, c.rotary_emb_base, c.use_parallel_residual, c.tie_word_embeddings) == (0.25, 1e4, True,
                                                                                                 False)
    assert (c.max_position_embeddings, c.layer_norm_eps, c.hidden_act, c.eos_token_id) == (2048, 1e-5, "gelu", 2)
    p = GPTNeoXConfig.polyglot_ko_1_3b()
    assert GPTNeoXConfig.from_dict(p.to_hf_dict()) == p
    with pytest.raises(FileNotFoundError):
        GPTNeoXConfig.from_json(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPTNeoXConfig.from_json(tmp_path / "broken.json")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1234) == 1234
    assert parse_size("10KB") == 10_000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("big")


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig.polyglot_ko_1_3b())
    assert all(p.is_meta for p in model.parameters())
    assert len(list(model.buffers())) == 0  # rotary tables are built lazily on the input's device


def test_tied_embeddings_survive_to_empty_and_casts():
    config = GPTNeoXConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, tie_word_embeddings=True)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to_empty(device="cpu")
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight
    model = model.to(torch.bfloat16)
    assert model.embed_out.weight is model.gpt_neox.embed_in.weight and model.dtype == torch.bfloat16
    assert model.num_parameters() == 320 * 64 + 2 * (4 * 64 + 3 * 64 * 64 + 3 * 64 + 64 * 64 + 64
                                                   + 2 * 64 * 128 + 128 + 64) + 2 * 64
