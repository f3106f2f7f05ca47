"""Inference-only CPU linear layers on oneDNN with pre-packed weights (the kernels torch.compile/inductor uses).

    y = x Wᵀ + b  [-> act(y)]  [-> y + residual]       x (..., K), W (N, K) packed once, re-packed when it changes

Why: PyTorch's eager `F.linear` on CPU calls MKL sgemm, which on this project's AMD EPYC host takes ~1.1× as long
as oneDNN's packed GEMM on MiniLM's shapes when the machine is idle and up to ~2× when the cores are shared
(`python -m bench.sbert_linear`); oneDNN also fuses the GELU / residual add into the GEMM's epilogue, saving
passes over the activations. Results equal `F.linear` up to fp32 summation
order (~1e-6 relative).

Used only when no gradient is recorded (`torch.no_grad` / `torch.inference_mode`), the module is in eval mode,
and the input is fp32 on CPU; everything else (training, CUDA, other dtypes, a torch build without these ops)
takes the plain `F.linear` path. `ONEDNN.enabled = False` turns the fast path off (tests compare both paths).
The packed copy costs one extra copy of the layer's weights in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACK_BATCH_HINT = 1024  # rows per GEMM oneDNN tunes its packing for (any row count works)
# hidden_act -> (oneDNN post-op, algorithm); activations not listed run after the GEMM
FUSED_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                     "relu": ("relu", "")}


@dataclass
class _Switch:
    enabled: bool = True
    _available: bool | None = None

    def available(self) -> bool:
        if self._available is None:
            try:
                with torch.inference_mode():
                    w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 2)
                    y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, torch.zeros(2), "none", [], "")
                self._available = bool(torch.allclose(y, torch.full((1, 2), 2.0)))
            except (AttributeError, RuntimeError, NotImplementedError):
                self._available = False
        return self._available


ONEDNN = _Switch()


def use_fast_path(module: nn.Module, x: Tensor) -> bool:
    return (ONEDNN.enabled and not module.training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and ONEDNN.available())


class PackedLinear:
    """oneDNN-packed weight + bias of one or more stacked `nn.Linear`s (stacked along the output dim).

    The pack is rebuilt whenever a weight or bias is replaced or changed: the check compares each tensor's storage
    pointer and version counter and a strided sample of its values (fused optimizers and `.data` writes update
    weights without bumping the version counter), so encoding between training steps uses the current weights."""

    FINGERPRINT_SAMPLES = 64

    def __init__(self, *linears: nn.Linear):
        self._linears = linears
        self._key: tuple | None = None
        self._fingerprint: list[Tensor] = []
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def __getstate__(self) -> dict:
        """deepcopy / pickle keep the linears but drop the pack (an opaque oneDNN tensor); it is rebuilt on use."""
        return {"_linears": self._linears, "_key": None, "_fingerprint": [], "weight": None, "bias": None}

    def _sample(self, p: Tensor) -> Tensor:
        flat = p.detach().reshape(-1)
        return flat[:: max(1, flat.numel() // self.FINGERPRINT_SAMPLES)]

    def _refresh(self) -> None:
        params = [p for lin in self._linears for p in (lin.weight, lin.bias)]
        key = tuple((p.data_ptr(), _version(p)) for p in params)
        if (key == self._key and len(self._fingerprint) == len(params)
                and all(torch.equal(self._sample(p), f) for p, f in zip(params, self._fingerprint))):
            return
        w = torch.cat([lin.weight.detach() for lin in self._linears])
        self.bias = torch.cat([lin.bias.detach() for lin in self._linears])
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        self._key, self._fingerprint = key, [self._sample(p).clone() for p in params]

    def __call__(self, x: Tensor, act: str = "", residual: Tensor | None = None) -> Tensor:
        """x (..., K) -> (..., N): x Wᵀ + b, then the fused `act` (a FUSED_ACTIVATIONS key) or + residual."""
        self._refresh()
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if act:
            op, algorithm = FUSED_ACTIVATIONS[act]
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, op, [], algorithm)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # tensors created under inference_mode keep no version counter: the fingerprint decides
        return -1


def plain_linear(linears: tuple[nn.Linear, ...], x: Tensor) -> Tensor:
    """The autograd path: one GEMM for stacked linears (q, k, v) or a plain F.linear."""
    if len(linears) == 1:
        return F.linear(x, linears[0].weight, linears[0].bias)
    return F.linear(x, torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]))


__all__ = ["ONEDNN", "FUSED_ACTIVATIONS", "PackedLinear", "plain_linear", "use_fast_path"]
