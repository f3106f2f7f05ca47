"""Inference-only linear layers with oneDNN pre-packed weights: ~1.5-2x faster batch-1 decoding on CPU.

Decoding one token multiplies a (1, in) activation by every weight matrix, so it is bound by how fast the
weights stream from memory. `F.linear` on CPU re-lays the (out, in) weight for oneDNN on every call (or takes a
slower generic GEMV path); measured on a Zen 4 CPU with 2 threads, a 8192 x 2048 bf16 GEMV ran at ~18 GB/s
with `F.linear` and ~45-80 GB/s (cache permitting) with the weight reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) and applied with `torch.ops.mkldnn._linear_pointwise` — the ops
PyTorch's own inductor uses for frozen CPU models. The result is bitwise equal to `F.linear` in bf16 (fp32:
within 1e-5, a different summation order).

    model = lora.merge_lora(model)        # adapters folded first: LoRALinear is left alone
    n = pack_linears(model)               # every nn.Linear -> PackedLinear (in place); 0 when unsupported

The packed model is for inference only: packed weights are opaque oneDNN tensors, not parameters (no
gradients, not in `state_dict()`, no `.to()`), and the dense weights are released (no extra memory). On a
build without oneDNN, on GPU, or for another dtype, `pack_linears` changes nothing and returns 0.
"""
from __future__ import annotations

import torch
from torch import nn

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def packing_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W pre-packed for oneDNN (CPU, inference only). x (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            # `weight` keeps the name so model.device / model.dtype (read from a weight) still work
            self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # opaque (out, in)
            self.bias = linear.bias.detach().clone() if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def _can_pack(linear: nn.Linear) -> bool:
    w = linear.weight
    return (type(linear) is nn.Linear and w.device.type == "cpu" and w.dtype in PACKABLE_DTYPES
            and w.layout == torch.strided)


@torch.no_grad()
def pack_linears(model: nn.Module, check: bool = True) -> int:
    """Replace every plain CPU `nn.Linear` of `model` by a `PackedLinear` (in place); returns how many.

    With `check`, the first packed layer is compared with `F.linear` on a random input and packing is
    abandoned (returns 0, model untouched) if they differ beyond rounding — a guard against a build whose
    private oneDNN ops behave differently."""
    if not packing_available():
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and _can_pack(child)]
    if not targets:
        return 0
    if check:
        linear = targets[0][2]
        x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
        try:
            got = PackedLinear(linear)(x)
        except RuntimeError:
            return 0
        want = linear(x)
        tol = 1e-2 if linear.weight.dtype == torch.bfloat16 else 1e-4     # relative; in practice bf16 is exact
        if got.shape != want.shape or (got.float() - want.float()).abs().max().item() > tol * max(
                1.0, want.abs().max().item()):
            return 0
    was_training = model.training
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    model.train(was_training)
    return len(targets)
