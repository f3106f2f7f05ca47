"""LoRALinear on a plain nn.Linear: the formula, init, merge/unmerge, dtypes, dropout, gradients."""
import math

import pytest
import torch
from torch import nn

from lora import LoRALinear
from lora.layer import dropout_keep_mask


def make(in_f=24, out_f=40, r=4, alpha=8.0, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    layer = LoRALinear(base, r=r, alpha=alpha, **kw)
    return base, layer


def randomize_b(layer, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def test_fresh_adapter_changes_nothing_and_shares_base_weights():
    base, layer = make()
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), base(x))                     # B = 0 -> bitwise the base output
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.weight.shape == (4, 24) and layer.lora_B.weight.shape == (40, 4)
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_the_formula(use_rslora):
    base, layer = make(r=4, alpha=8.0, use_rslora=use_rslora)
    randomize_b(layer)
    x = torch.randn(2, 7, 24)
    s = 8.0 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == pytest.approx(s)
    expected = x @ base.weight.T + base.bias + s * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert (layer(x) - base(x)).abs().max() > 1e-2           # the adapter does something


def test_inits():
    _, kaiming = make(in_f=400, out_f=300, r=64)
    bound = 1.0 / math.sqrt(400)                              # kaiming_uniform(a=√5) = U(-1/√in, 1/√in)
    a = kaiming.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert torch.count_nonzero(kaiming.lora_B.weight) == 0
    _, gauss = make(in_f=400, out_f=300, r=64, init="gaussian")
    assert gauss.lora_A.weight.std().item() == pytest.approx(1 / 64, rel=0.03)
    assert torch.count_nonzero(gauss.lora_B.weight) == 0
    _, rand = make(in_f=400, out_f=300, r=64, init=False)
    assert rand.lora_B.weight.abs().max() <= 1 / math.sqrt(64) and rand.lora_B.weight.std() > 0.05
    rand.init = True
    rand.reset_lora_parameters()
    assert torch.count_nonzero(rand.lora_B.weight) == 0
    with pytest.raises(ValueError, match="init"):
        make(init="pissa")
    with pytest.raises(ValueError, match="rank"):
        make(r=0)


def test_merge_unmerge_fp32():
    base, layer = make(init=False)
    x = torch.randn(4, 24)
    w0 = base.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight(), atol=0, rtol=0)
    assert (base.weight - w0).abs().max() > 1e-2
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.bias is layer.bias
    torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=0)


def test_bf16_base_keeps_fp32_adapter_and_merges_in_bf16():
    base, layer = make(init=False)
    base.to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8.0, init=False)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() @ base.weight.float().T + base.bias.float()
           + layer.scaling * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T))
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)   # bf16 output rounding only
    y.float().sum().backward()                  # the fp32 adapter gets fp32 gradients through the bf16 output
    assert layer.lora_B.weight.grad.dtype == torch.float32
    grad_b = layer.scaling * torch.ones(3, 40).T @ (x.float() @ layer.lora_A.weight.detach().T)
    torch.testing.assert_close(layer.lora_B.weight.grad, grad_b, atol=1e-4, rtol=1e-4)
    w0 = base.weight.detach().clone()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight.float(), (w0.float() + layer.delta_weight()), atol=0.02, rtol=0.01)
    layer.unmerge()   # W + Δ - Δ in bf16: within a couple of bf16 ulps of |W| + |Δ|, not bitwise
    ulp = (w0.float().abs() + layer.delta_weight().abs()) * 2.0 ** -7
    assert ((layer.weight.float() - w0.float()).abs() <= 2 * ulp + 1e-6).all()


def test_autocast_runs_both_paths_in_autocast_dtype():
    _, layer = make(init=False)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.03)


def test_dropout_only_on_the_lora_path_and_only_in_training():
    base, layer = make(dropout=0.5)
    randomize_b(layer)
    x = torch.randn(64, 24)
    layer.eval()
    assert torch.equal(layer(x), layer(x))                    # eval: dropout skipped, deterministic
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.equal(y_train, layer.eval()(x))
    # What dropout changes is only the LoRA update: y - W·x - b = s·B·A·dropout(x)
    torch.manual_seed(0)
    keep, p = dropout_keep_mask(x.shape, 0.5, x.device)   # the draw the layer made
    mask = keep / (1 - p)
    assert p == 0.5 and 0.4 < float((mask == 0).float().mean()) < 0.6
    expected = base(x) + layer.scaling * ((x * mask) @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y_train, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_keep_mask_rate(p):
    """Drop rate = round(p·2¹⁶)/2¹⁶ within 4 standard errors over 10⁶ draws, in every 16-bit lane position."""
    torch.manual_seed(0)
    keep, exact = dropout_keep_mask(torch.Size((1000, 1000)), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000) and abs(exact - p) <= 2 ** -17
    se = (exact * (1 - exact) / 250_000) ** 0.5
    for lane in range(4):   # words are split in 4 lanes: each lane must be unbiased (no fixed sign bit)
        rate = 1 - float(keep.flatten()[lane::4].float().mean())
        assert abs(rate - exact) < 4 * se, (lane, rate, exact)


@pytest.mark.parametrize("autocast", [False, True])
def test_dropout_gradients_equal_autograd_with_the_same_mask(autocast):
    """DroppedLoRAUpdate's hand-written backward = autograd through the formula with the same mask."""
    base, layer = make(dropout=0.3, init=False)
    base.requires_grad_(False)
    layer.train()
    x = torch.randn(2, 7, 24, requires_grad=True)
    g = torch.randn(2, 7, base.out_features)
    def grads(forward, bf16: bool) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = forward()
        y.float().backward(g)
        return [x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]

    def by_formula():
        keep, p = dropout_keep_mask(x.shape, 0.3, x.device)
        m = keep / (1 - p)
        return base(x) + layer.scaling * layer.lora_B(layer.lora_A(x * m))

    ours, reference = grads(lambda: layer(x), autocast), grads(by_formula, False)   # reference in fp32
    for a, b in zip(ours, reference):   # bf16: autograd's own bf16 path is off by the same ~0.5 % of max
        assert float((a - b).abs().max() / b.abs().max()) < (1.5e-2 if autocast else 1e-6)
    assert float(ours[1].abs().sum()) > 0


def test_gradients_reach_only_a_and_b():
    base, layer = make(init=False)
    base.requires_grad_(False)
    layer(torch.randn(5, 24)).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0


def test_meta_device():
    with torch.device("meta"):
        base = nn.Linear(2048, 6144)
    layer = LoRALinear(base, r=128, alpha=16, init="gaussian")
    assert layer.lora_A.weight.is_meta and layer.lora_A.weight.shape == (128, 2048)
    assert sum(p.numel() for p in (layer.lora_A.weight, layer.lora_B.weight)) == 128 * (2048 + 6144)
