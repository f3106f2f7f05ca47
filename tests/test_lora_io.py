"""Adapter files: exact round trip, PEFT-compatible config/keys, tolerant of unknown fields, strict on math."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora
from gptneox import GPTNeoXConfig, GPTNeoXForCausalLM
from lora.io import AdapterError
from lora_fixtures import lora_state, randomize_lora

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
IDS = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))


def tiny_model():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)).eval()


@pytest.fixture
def saved(tmp_path):
    """An adapter (qkv + dense, r=4, rsLoRA, gaussian) saved by us; returns (folder, model)."""
    model = tiny_model()
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query_key_value", "dense"],
                                            use_rslora=True, init="gaussian"))
    randomize_lora(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="EleutherAI/polyglot-ko-1.3b")
    return tmp_path / "adapter", model


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_round_trip_is_exact_and_files_are_peft_shaped(saved):
    folder, model = saved
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    d = json.loads((folder / "adapter_config.json").read_text())
    assert {k: d[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                              "fan_in_fan_out", "use_rslora", "init_lora_weights", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
        "target_modules": ["query_key_value", "dense"], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": True, "init_lora_weights": "gaussian", "base_model_name_or_path": "EleutherAI/polyglot-ko-1.3b"}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    assert len(keys) == 2 * 2 * 2
    assert keys[0] == "base_model.model.gpt_neox.layers.0.attention.dense.lora_A.weight"
    assert "base_model.model.gpt_neox.layers.1.attention.query_key_value.lora_B.weight" in keys

    loaded = lora.load_adapter(tiny_model(), folder)
    assert loaded.lora_config == model.lora_config
    want = lora_state(model)
    assert all(torch.equal(v, want[k]) for k, v in lora_state(loaded).items()) and len(want) == 8
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_unknown_and_null_fields_are_ignored(saved):
    folder, model = saved
    edit_config(folder, some_field_from_peft_1_0={"x": 1}, lora_dropout=None, megatron_config=None,
                layers_pattern=None, exclude_modules=None, rank_pattern=None, init_lora_weights="eva")
    loaded = lora.load_adapter(tiny_model(), folder)
    assert loaded.lora_config.dropout == 0.0 and loaded.lora_config.r == 4
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


@pytest.mark.parametrize("field,value", [("use_dora", True), ("lora_bias", True), ("bias", "all"),
                                         ("rank_pattern", {"dense": 8}), ("alpha_pattern", {"dense": 2}),
                                         ("modules_to_save", ["embed_out"]), ("layers_to_transform", [0]),
                                         ("fan_in_fan_out", True), ("init_lora_weights", "pissa")])
def test_math_changing_fields_are_refused_by_name(saved, field, value):
    folder, _ = saved
    edit_config(folder, **{field: value})
    model = tiny_model()
    with pytest.raises(AdapterError, match=rf"adapter_config.json: field '{field}'"):
        lora.load_adapter(model, folder)
    assert not list(lora.lora_layers(model))                  # the model was not touched


def test_wrong_shapes_and_wrong_tensor_sets_name_the_tensor(saved, tmp_path):
    folder, _ = saved
    edit_config(folder, r=8)
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.gpt_neox\.layers\.0\.attention\.query_key_value"
                                           r"\.lora_A\.weight has shape \(4, 64\), the model needs \(8, 64\)"):
        lora.load_adapter(tiny_model(), folder)
    edit_config(folder, r=4, target_modules=["query_key_value"])
    with pytest.raises(AdapterError, match=r"unexpected tensors: .*attention\.dense\.lora_A\.weight"):
        lora.load_adapter(tiny_model(), folder)
    edit_config(folder, target_modules=["query_key_value", "dense", "dense_h_to_4h"])
    with pytest.raises(AdapterError, match=r"missing tensors: .*mlp\.dense_h_to_4h\.lora_A\.weight"):
        lora.load_adapter(tiny_model(), folder)
    edit_config(folder, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"matches no module.*gpt_neox\.layers\.\*\.attention\.query_key_value"):
        lora.load_adapter(tiny_model(), folder)
    big = GPTNeoXForCausalLM(GPTNeoXConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 4})).eval()
    edit_config(folder, target_modules=["query_key_value", "dense"])
    with pytest.raises(AdapterError, match="has shape .* the model needs .*another base model"):
        lora.load_adapter(big, folder)


def test_missing_files_and_pickles(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tiny_model(), tmp_path / "nothing")
    folder, _ = saved
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        lora.load_adapter(tiny_model(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        lora.read_adapter_config(folder)


def test_regex_targets_and_peft_key_prefix(tmp_path):
    model = tiny_model()
    regex = r"gpt_neox\.layers\.1\.\w+\.(query_key_value|dense\w*)"     # every Linear of layer 1
    lora.inject_lora(model, lora.LoRAConfig(r=2, target_modules=regex))
    randomize_lora(model)
    lora.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == regex
    loaded = lora.load_adapter(tiny_model(), tmp_path / "a")
    assert [n for n, _ in lora.lora_layers(loaded)] == [n for n, _ in lora.lora_layers(model)]
    assert len(list(lora.lora_layers(loaded))) == 4
    # keys without PEFT's "base_model.model." prefix are not ours to guess: reported as unexpected
    tensors = {k.removeprefix("base_model.model."): v for k, v in lora_state(model).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="missing tensors: base_model.model.gpt_neox"):
        lora.load_adapter(tiny_model(), tmp_path / "a")


def test_save_needs_values_and_a_config(tmp_path):
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**TINY))
    lora.inject_lora(model, lora.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="meta device"):
        lora.save_adapter(model, tmp_path / "x")
    with pytest.raises(ValueError, match="no lora_config"):
        lora.save_adapter(tiny_model(), tmp_path / "x")
    assert not (tmp_path / "x" / "adapter_config.json").exists()
