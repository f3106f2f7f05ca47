"""oneDNN pre-packed linear layers for CPU inference, and the one check of whether this CPU can run them.

    y = x Wᵀ + b  [-> act(y)]  [-> y + residual]        x (..., K), W (N, K) reordered once into oneDNN's layout

Why: eager `F.linear` on CPU re-lays the weight for every call (or takes MKL's sgemm); the weight reordered once
(`torch.ops.mkldnn._reorder_linear_weight`) and applied with `torch.ops.mkldnn._linear_pointwise` — the ops
PyTorch's inductor uses for frozen CPU models — streams faster: ~1.5–2× for batch-1 decoding (memory bound) and
~1.1–2× for encoder GEMMs, which also get GELU / residual add fused into the GEMM epilogue. bf16 results equal
`F.linear` bitwise, fp32 within ~1e-6 relative (another summation order).

Two ways to use it:

    n = pack_linears(model)        # inference: every nn.Linear -> PackedLinear, dense weights released
    cache = PackCache()            # training model that also encodes: a packed copy of live nn.Linears,
    y = cache((q, k, v), x)        #   built on first use, dropped by invalidate_packs(model) — which the
                                   #   optimizer step hook (`invalidate_on_step`) and load_state_dict call

Capability: `packing_available(dtype)` runs a tiny reorder + GEMM in that dtype once and caches the answer. On
CPUs without native bf16 (AVX2-only, e.g. AMD EPYC Milan: oneDNN needs avx512bw/vl/dq or avx_ne_convert) bf16
packing is refused and everything takes the plain path; `native_bf16()` tells callers choosing a default dtype.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACK_BATCH_HINT = 1024  # rows per GEMM oneDNN tunes the packing for (any row count works)
# hidden_act -> (oneDNN post-op, algorithm); activations not listed run after the GEMM
FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                     "relu": ("relu", "")}


@lru_cache(maxsize=None)
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Can this build *and this CPU* run packed linears in `dtype`? Probed once per dtype with a real GEMM."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not native_bf16():
        return False
    try:
        with torch.inference_mode():
            w = torch.arange(64, dtype=torch.float32).reshape(8, 8).div(64).to(dtype)
            x = torch.ones(2, 8, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, torch.zeros(8, dtype=dtype), "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-3))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@lru_cache(maxsize=None)
def native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX-512 BF16/AMX or avx512bw/vl/dq); on AVX2 it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """x Wᵀ + b with W (one or more stacked `nn.Linear`s, stacked along the output dim) packed for oneDNN.

    Inference only: the packed weight is an opaque oneDNN tensor, not a parameter (no gradients, not in
    `state_dict()`, no `.to()`)."""

    def __init__(self, *linears: nn.Linear, batch_hint: int = PACK_BATCH_HINT):
        super().__init__()
        self.in_features = linears[0].in_features
        self.out_features = sum(lin.out_features for lin in linears)
        with torch.no_grad():
            w = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
            # `weight` keeps the name so model.device / model.dtype (read from a weight) still work
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)  # opaque (out, in)
            biases = [lin.bias for lin in linears]
            self.bias = (torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases)
                         else None if all(b is None for b in biases)
                         else torch.cat([b.detach() if b is not None else w.new_zeros(lin.out_features)
                                         for b, lin in zip(biases, linears)]))

    def forward(self, x: Tensor, act: str = "", residual: Tensor | None = None) -> Tensor:
        """x (..., K) -> (..., N): x Wᵀ + b, then the fused `act` (a FUSED_ACTIVATIONS key) or + residual."""
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if act:
            op, algorithm = FUSED_ACTIVATIONS[act]
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, op, [], algorithm)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def _can_pack(linear: nn.Linear) -> bool:
    w = linear.weight
    return (type(linear) is nn.Linear and w.device.type == "cpu" and w.layout == torch.strided
            and packing_available(w.dtype))


@torch.no_grad()
def pack_linears(model: nn.Module, check: bool = True) -> int:
    """Replace every plain CPU `nn.Linear` of `model` by a `PackedLinear` (in place); returns how many.

    Returns 0 (model untouched) where the CPU or build cannot pack the weights' dtype. With `check`, the first
    layer is also compared with `F.linear` on a random input — a guard against private ops that changed."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and _can_pack(child)]
    if not targets:
        return 0
    if check:
        linear = targets[0][2]
        x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
        try:
            got = PackedLinear(linear, batch_hint=1)(x)
        except RuntimeError:
            return 0
        want = linear(x)
        tol = 1e-2 if linear.weight.dtype == torch.bfloat16 else 1e-4  # relative; in practice bf16 is exact
        if got.shape != want.shape or (got.float() - want.float()).abs().max().item() > tol * max(
                1.0, want.abs().max().item()):
            return 0
    was_training = model.training
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, batch_hint=1))  # decoding: one row per GEMM
    model.train(was_training)
    return len(targets)


class PackCache:
    """A packed copy of live `nn.Linear`s for a model that trains *and* encodes (not a module: no state).

    Built on first use, dropped by `invalidate_packs` — explicitly, when the weights change (optimizer step,
    load_state_dict, `.to()`), never guessed from the values."""

    def __init__(self) -> None:
        self.packed: PackedLinear | None = None

    def __call__(self, linears: tuple[nn.Linear, ...], x: Tensor, act: str = "",
                 residual: Tensor | None = None) -> Tensor:
        if self.packed is None:
            self.packed = PackedLinear(*linears)
        return self.packed(x, act, residual)

    def __getstate__(self) -> dict:  # deepcopy / pickle drop the opaque pack; it is rebuilt on use
        return {"packed": None}


def use_fast_path(module: nn.Module, x: Tensor) -> bool:
    """The packed path runs only for fp32 CPU inference (eval mode, no autograd) where oneDNN is available."""
    return (not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and FAST_PATH.enabled and packing_available(torch.float32))


class _Switch:
    """`FAST_PATH.enabled = False` sends every PackCache user down the plain F.linear path (tests compare both)."""
    enabled: bool = True


FAST_PATH = _Switch()


def invalidate_packs(model: nn.Module) -> None:
    """Drop every PackCache of `model`: the next inference forward re-packs the current weights."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PackCache):
                value.packed = None


def invalidate_on_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Re-pack after every optimizer step (the hook fires after the weights were updated)."""
    optimizer.register_step_post_hook(lambda *_: invalidate_packs(model))


def plain_linear(linears: tuple[nn.Linear, ...], x: Tensor) -> Tensor:
    """The autograd path: one GEMM for stacked linears (q, k, v) or a plain F.linear."""
    if len(linears) == 1:
        return F.linear(x, linears[0].weight, linears[0].bias)
    return F.linear(x, torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]))
