"""Our LoRA on our Gemma vs PEFT on transformers' Gemma2ForCausalLM / Gemma3ForCausalLM (tiny, 2 layers, fp32):
the family's default targets, adapter files both ways (logits equal), merge / unmerge / merge_lora."""
import copy

import peft
import pytest
import torch

import lora
from gemma import GemmaForCausalLM, load_model, save_pretrained
from gemma_fixtures import WINDOW, save_tiny_hf_gemma
from lora_fixtures import lora_state, peft_lora_state, randomize_lora

KINDS = ("gemma2", "gemma3")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4  # fp32; measured 0 to ~1e-6


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_hf_gemma(tmp_path_factory.mktemp(request.param), request.param)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(5, hf.config.vocab_size, (2, 2 * WINDOW), generator=torch.Generator().manual_seed(0))
    return folder, hf, ids


@torch.no_grad()
def logits(model, ids):
    out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_default_targets_are_every_linear_of_a_block(tiny, one_thread):
    folder, hf, _ = tiny
    assert list(GemmaForCausalLM.LORA_TARGETS) == TARGETS
    ours = load_model(folder)
    report = lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, target_modules=list(ours.LORA_TARGETS)))
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 task_type="CAUSAL_LM"))
    assert len(report.wrapped) == 7 * ours.config.num_hidden_layers
    assert sorted(lora_state(ours)) == sorted(peft_lora_state(ref))  # the same modules, by the same names
    assert report.trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad)


def test_our_saved_adapter_loads_into_peft(tiny, tmp_path, one_thread):
    folder, hf, ids = tiny
    base = load_model(folder)
    assert max_diff(logits(base, ids), logits(hf, ids)) < TOL  # base parity first
    ours = load_model(folder)
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=TARGETS))
    randomize_lora(ours, seed=5)  # B != 0: a missing module or a wrong scale shows in the logits
    lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(folder))
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    got = logits(ours.eval(), ids)
    assert max_diff(got, logits(base, ids)) > 1e-2  # the adapter matters
    assert max_diff(got, logits(ref, ids)) < TOL


def test_peft_saved_adapter_loads_into_ours(tiny, tmp_path, one_thread):
    folder, hf, ids = tiny
    torch.manual_seed(11)
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    ref.eval().save_pretrained(tmp_path / "peft_adapter")
    ours = lora.load_adapter(load_model(folder), tmp_path / "peft_adapter").eval()
    assert ours.lora_config.r == 8 and sorted(ours.lora_config.target_modules) == sorted(TARGETS)
    assert len(list(lora.lora_layers(ours))) == 7 * ours.config.num_hidden_layers
    got, want = logits(ours, ids), logits(ref, ids)
    assert max_diff(got, logits(hf, ids)) > 1e-2
    assert max_diff(got, want) < TOL


def test_merge_unmerge_and_merge_lora(tiny, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    folder, _, ids = tiny
    ours = load_model(folder)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.inject_lora(ours, lora.LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    randomize_lora(ours, seed=9)
    ours.eval()
    want = logits(ours, ids)
    layers = [layer for _, layer in lora.lora_layers(ours)]
    for layer in layers:
        layer.merge()
    assert max_diff(logits(ours, ids), want) < TOL
    for layer in layers:
        layer.unmerge()
    assert max_diff(logits(ours, ids), want) < TOL
    after = ours.state_dict()
    assert max(max_diff(after[k], v) for k, v in before.items()) < 1e-6  # the base weights are back
    merged = lora.merge_lora(ours)
    assert not any(True for _ in lora.lora_layers(merged))
    assert set(merged.state_dict()) == set(before)  # the base's keys, nothing else
    assert max_diff(logits(merged, ids), want) < TOL
    save_pretrained(merged, tmp_path / "merged")  # the merged model is a plain Gemma folder for transformers
    hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert max_diff(logits(hf_merged, ids), want) < TOL
