"""core.onednn: capability-chosen packing — exact where the CPU supports a dtype, a clean decline where not."""
import pytest
import torch
from torch import nn

from core import onednn


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False)).to(dtype).eval()


@pytest.fixture
def no_native_bf16(monkeypatch):
    """Pretend to be an AVX2-only CPU (oneDNN refuses bf16 reorders there)."""
    onednn.packing_available.cache_clear()
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    yield
    onednn.packing_available.cache_clear()


def test_avx2_like_cpu_declines_bf16_but_packs_fp32(no_native_bf16):
    if not onednn.packing_available(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear ops")
    assert not onednn.packing_available(torch.bfloat16)
    model = _mlp(torch.bfloat16)
    assert onednn.pack_linears(model) == 0
    assert all(type(m) is not onednn.PackedLinear for m in model.modules())
    assert onednn.pack_linears(_mlp(torch.float32)) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_plain_where_supported(dtype):
    if not onednn.packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU (native bf16: {onednn.native_bf16()})")
    model = _mlp(dtype)
    x = torch.randn(3, 16).to(dtype)
    with torch.no_grad():
        want = model(x)
        assert onednn.pack_linears(model) == 2
        got = model(x)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_pack_with_fused_epilogues():
    if not onednn.packing_available(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear ops")
    torch.manual_seed(1)
    a, b = nn.Linear(8, 4), nn.Linear(8, 6)
    x, res = torch.randn(5, 8), torch.randn(5, 10)
    with torch.no_grad():
        packed = onednn.PackedLinear(a, b)
        plain = onednn.plain_linear((a, b), x)
        torch.testing.assert_close(packed(x), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(x, act="gelu"), torch.nn.functional.gelu(plain), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(x, residual=res), plain + res, rtol=1e-5, atol=1e-5)
