"""inject_lora / merge_lora on our GPT-NeoX: matching, freezing, counts, merge round trip, one AdamW step."""
import pytest
import torch
from torch import nn

import lora
from gptneox import GPTNeoXConfig, GPTNeoXForCausalLM
from lora_fixtures import randomize_lora
from train.optim import build_adamw

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**TINY)).eval()


IDS = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))


def polyglot_on_meta():
    with torch.device("meta"):
        return GPTNeoXForCausalLM(GPTNeoXConfig.polyglot_ko_1_3b())


def test_polyglot_parameter_counts_on_meta():
    model = polyglot_on_meta()
    base_total = sum(p.numel() for p in model.parameters())
    assert base_total == 1_331_810_304
    report = lora.inject_lora(model, lora.LoRAConfig(r=128, alpha=16))      # the four default targets
    assert report.trainable == 100_663_296 == 24 * 128 * ((2048 + 6144) + (2048 + 2048) + 2 * (2048 + 8192))
    assert report.total == base_total + report.trainable
    assert len(report.wrapped) == 96
    assert "trainable parameters: 100,663,296 of 1,432,473,600" in str(report)
    assert lora.LoRAConfig.original_ohlora() == lora.LoRAConfig(r=128, alpha=16, dropout=0.05,
                                                                  target_modules=["query_key_value"], init="gaussian")
    model = polyglot_on_meta()
    report = lora.inject_lora(model, lora.LoRAConfig.original_ohlora())
    assert report.trainable == 25_165_824 == 24 * 128 * (2048 + 6144)
    assert str(report).startswith("LoRA r=128, alpha=16 (α/r = 0.125) on 24 Linear modules: query_key_value ×24")
    merged = lora.merge_lora(model)                                         # works on meta too
    assert sum(p.numel() for p in merged.parameters()) == base_total
    assert list(merged.state_dict()) == list(polyglot_on_meta().state_dict())


def test_suffix_and_regex_matching():
    model = tiny_model()
    report = lora.inject_lora(model, lora.LoRAConfig(r=2, target_modules=["dense"]))
    assert report.wrapped == ["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"]
    report = lora.inject_lora(tiny_model(), lora.LoRAConfig(r=2, target_modules=r".*\.1\.mlp\.dense_.*"))
    assert report.wrapped == ["gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]
    # a regex must match the whole name, as PEFT's re.fullmatch
    with pytest.raises(ValueError, match="matches no module"):
        lora.inject_lora(tiny_model(), lora.LoRAConfig(r=2, target_modules="dense"))
    # full names work as list entries too
    report = lora.inject_lora(tiny_model(), lora.LoRAConfig(r=2, target_modules=["embed_out"]))
    assert report.wrapped == ["embed_out"] and report.trainable == 2 * (64 + 320)


def test_bad_targets_are_errors_naming_the_linear_modules():
    with pytest.raises(ValueError) as e:
        lora.inject_lora(tiny_model(), lora.LoRAConfig(target_modules=["query_key_value", "q_proj"]))
    msg = str(e.value)
    assert "['q_proj']" in msg and "gpt_neox.layers.*.attention.query_key_value" in msg and "embed_out" in msg
    assert "layers.0." not in msg                                          # abbreviated
    with pytest.raises(ValueError, match="not a valid regex"):
        lora.LoRAConfig(target_modules="layers.(")
    with pytest.raises(ValueError, match="GPTNeoXAttention.*nn.Linear"):
        lora.inject_lora(tiny_model(), lora.LoRAConfig(target_modules=["attention"]))
    model = tiny_model()
    lora.inject_lora(model, lora.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject_lora(model, lora.LoRAConfig(r=2))


def test_injection_freezes_base_and_keeps_state_dict_keys():
    model = tiny_model()
    base_keys = set(model.state_dict())
    lora.inject_lora(model, lora.LoRAConfig(r=4))
    keys = set(model.state_dict())
    assert base_keys < keys
    assert {k for k in keys - base_keys if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))} == set()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == keys - base_keys and len(trainable) == 2 * 4 * 2


def test_merge_unmerge_and_merge_lora_keep_logits():
    base = tiny_model()
    model = tiny_model()
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8))
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(IDS)
        assert (unmerged - base(IDS)).abs().max() > 1e-2
        for _, layer in lora.lora_layers(model):
            layer.merge()
        torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=0)
        for _, layer in lora.lora_layers(model):
            layer.unmerge()
        torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=0)
        state = model.state_dict()
        for name, w0 in base.state_dict().items():     # unmerge gives the base weights back (fp32: ~1 ulp)
            torch.testing.assert_close(state[name], w0, atol=1e-6, rtol=0, msg=name)
        plain = lora.merge_lora(model)
        assert plain is model and not hasattr(plain, "lora_config")
        assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("dense", "query_key_value")))
        assert list(plain.state_dict()) == list(base.state_dict())
        torch.testing.assert_close(plain(IDS), unmerged, atol=1e-5, rtol=0)


def test_gradients_only_into_adapters_and_adamw_leaves_base_bitwise():
    model = tiny_model()
    lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = build_adamw(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        logits = model(IDS)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 320), IDS[:, 1:].reshape(-1))
        loss.backward()
        for n, p in model.named_parameters():
            if "lora_B" in n or ("lora_A" in n and step == 1):
                assert p.grad.abs().sum() > 0, n
            elif "lora_A" in n:    # step 0: B = 0, and dL/dA = s·Bᵀ·(dL/dy)·xᵀ = 0 -- only B learns first
                assert torch.count_nonzero(p.grad) == 0, n
            else:
                assert p.grad is None, n
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora.lora_layers(model))
