"""Our LoRA on our GPT-NeoX vs PEFT on transformers' GPT-NeoX: same init, same logits, files both ways."""
import copy
import json

import peft
import pytest
import torch
import transformers

import lora
from gptneox import load_model, save_pretrained
from lora_fixtures import copy_lora_into_peft, lora_state, peft_lora_state, randomize_lora
from neox_fixtures import save_tiny_hf_neox

FOUR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
QKV = ["query_key_value"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_hf_neox(tmp_path_factory.mktemp("tiny_neox"))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    return folder, hf, ids


def peft_config(targets, init, r=8, alpha=16, use_rslora=False, dropout=0.05):
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                           init_lora_weights=init, use_rslora=use_rslora, task_type="CAUSAL_LM")


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("targets,init,use_rslora", [(FOUR, True, False), (FOUR, "gaussian", False),
                                                     (QKV, True, False), (QKV, "gaussian", True)])
def test_same_seed_same_init_and_same_logits_as_get_peft_model(tiny, targets, init, use_rslora):
    folder, hf, ids = tiny
    ours = load_model(folder).eval()
    torch.testing.assert_close(our_logits(ours, ids), peft_logits(hf, ids), atol=1e-5, rtol=0)  # base parity

    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(hf), peft_config(targets, init, use_rslora=use_rslora)).eval()
    torch.manual_seed(7)
    report = lora.inject_lora(ours, lora.LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules=targets,
                                                    init=init, use_rslora=use_rslora))
    ours.eval()
    # Same seed, same module order -> PEFT's very initial A and B, bitwise (B = 0, A Kaiming or Gaussian).
    theirs = peft_lora_state(ref)
    assert lora_state(ours).keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in lora_state(ours).items())
    assert report.trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad)

    randomize_lora(ours)                 # B != 0 so a wrong scale or a missing module shows in the logits
    copy_lora_into_peft(ours, ref)
    got, want = our_logits(ours, ids), peft_logits(ref, ids)
    assert (got - our_logits(load_model(folder).eval(), ids)).abs().max() > 1e-2   # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_init_false_matches_peft_random_b(tiny):
    folder, hf, ids = tiny
    torch.manual_seed(3)
    ref = peft.get_peft_model(copy.deepcopy(hf), peft_config(FOUR, False)).eval()
    ours = load_model(folder).eval()
    torch.manual_seed(3)
    lora.inject_lora(ours, lora.LoRAConfig(r=8, alpha=16, target_modules=FOUR, init=False))
    theirs = peft_lora_state(ref)
    assert all(torch.equal(v, theirs[k]) for k, v in lora_state(ours).items())
    assert all(v.abs().sum() > 0 for k, v in lora_state(ours).items() if k.endswith("lora_B.weight"))
    torch.testing.assert_close(our_logits(ours.eval(), ids), peft_logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [QKV, FOUR])
def test_peft_saved_adapter_loads_into_ours(tiny, tmp_path, targets):
    folder, hf, ids = tiny
    torch.manual_seed(11)   # the original Oh-LoRA setting (gaussian, r=128 -> here r=16), random B
    ref = peft.get_peft_model(copy.deepcopy(hf), peft_config(targets, "gaussian", r=16, alpha=16)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    ref.save_pretrained(tmp_path / "peft_adapter")
    assert len(json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())) > 30

    ours = lora.load_adapter(load_model(folder), tmp_path / "peft_adapter").eval()
    assert ours.lora_config.r == 16 and ours.lora_config.init == "gaussian" and ours.lora_config.dropout == 0.05
    assert sorted(ours.lora_config.target_modules) == sorted(targets)       # PEFT writes a set: any order
    assert len(list(lora.lora_layers(ours))) == 2 * len(targets)
    if targets == QKV:
        assert [n for n, _ in lora.lora_layers(ours)] == ["gpt_neox.layers.0.attention.query_key_value",
                                                          "gpt_neox.layers.1.attention.query_key_value"]
    torch.testing.assert_close(our_logits(ours, ids), peft_logits(ref, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [lora.LoRAConfig(r=4, alpha=8, target_modules=FOUR, use_rslora=True),
                                    lora.LoRAConfig.original_ohlora(),
                                    lora.LoRAConfig(r=4, alpha=8, target_modules=r".*\.1\.mlp\.dense_h_to_4h")])
def test_our_saved_adapter_loads_into_peft(tiny, tmp_path, config):
    folder, hf, ids = tiny
    ours = load_model(folder)
    report = lora.inject_lora(ours, config)
    randomize_lora(ours, seed=5)
    lora.save_adapter(torch.compile(ours), tmp_path / "ours", base_model_name_or_path=str(folder))  # unwrapped
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    pc = ref.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.use_rslora, pc.init_lora_weights) == (config.r, config.alpha,
                                                                         config.use_rslora, config.init)
    assert sorted(peft_lora_state(ref)) == sorted(lora_state(ours)) and len(report.wrapped) >= 1
    torch.testing.assert_close(peft_logits(ref, ids), our_logits(ours.eval(), ids), atol=1e-5, rtol=0)


def test_merged_export_loads_in_transformers(tiny, tmp_path):
    folder, _, ids = tiny
    ours = load_model(folder)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8))
    randomize_lora(ours, seed=9)
    ours.eval()
    want = our_logits(ours, ids)
    merged = lora.merge_lora(ours)
    assert not any(True for _ in lora.lora_layers(merged))
    assert set(merged.state_dict()) == set(load_model(folder).state_dict())   # the base's keys, nothing else
    save_pretrained(merged, tmp_path / "merged")
    hf_merged = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(peft_logits(hf_merged, ids), want, atol=1e-5, rtol=0)
