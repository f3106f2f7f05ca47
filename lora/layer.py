"""`LoRALinear`: a frozen `nn.Linear` plus a trainable low-rank update (Hu et al., 2021, arXiv:2106.09685).

Everything about one LoRA layer lives here: the math, the initialisation (matching PEFT 0.21), merging the
update into the frozen weight for inference, and the dtype rules when the base is bf16/fp16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_init(init: bool | str) -> bool | str:
    """Validate `init` (PEFT's `init_lora_weights`, so it round-trips through adapter_config.json)."""
    if isinstance(init, bool):
        return init
    if isinstance(init, str) and init.lower() == "gaussian":
        return "gaussian"
    if isinstance(init, str) and init.lower() == "kaiming":  # the command line's name for True
        return True
    raise ValueError(f"LoRA init must be True (Kaiming-uniform A), 'kaiming', 'gaussian' or False, got {init!r}")


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool keep-mask of `shape`, the exact drop probability it used), from torch's RNG (manual_seed repeats it).

    Each element gets 16 random bits, drawn 64 at a time, and is dropped when they fall below k = round(p·2¹⁶):
    P(drop) = k / 2¹⁶ (0.05 -> 0.0500031), and the caller scales by 1 / (1 - that). On CPU this is 5x faster
    than `bernoulli_`, which spent 14 % of a Gemma LoRA step drawing one number per element."""
    n, k = math.prod(shape), round(p * 65536)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n]                     # uniform on [-2¹⁵, 2¹⁵)
    return (lanes >= k - 32768).view(shape), k / 65536


class DroppedLoRAUpdate(torch.autograd.Function):
    r"""u = B·A·(x ⊙ m / (1-p)), m ~ Bernoulli(1-p) (dropout on the adapter's input), gradients by hand:

        a = A·x̃,  x̃ = x ⊙ m / (1-p)     (..., r)          ∂L/∂B = Σ ∂L/∂u · aᵀ          (out, r)
        u = B·a                          (..., out)        ∂L/∂a = Bᵀ·∂L/∂u              (..., r)
                                                           ∂L/∂A = Σ ∂L/∂a · x̃ᵀ          (r, in)
                                                           ∂L/∂x = m ⊙ (Aᵀ·∂L/∂a) / (1-p)  (..., in)
    Autograd through `lora_B(lora_A(dropout(x)))` keeps dropout's scaled mask and the dropped copy of x: two
    tensors the size of x in x's dtype per adapted Linear, half of a LoRA fine-tune's activations. This keeps x
    itself (shared by the adapters on the same input: q, k, v), m as bools and a. Matmuls run in x's dtype
    (autocast's, when on); gradients come back in the adapter's dtype. `keep` = m (dropout_keep_mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                p: float) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_dtype, x = x.dtype, x.to(dtype)
        a = F.linear(x * keep / (1.0 - p), A.to(dtype))                     # (..., r)
        ctx.save_for_backward(x, keep, A, B, a)
        ctx.p, ctx.x_dtype = p, x_dtype
        return F.linear(a, B.to(dtype))                                      # (..., out)

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        x, keep, A, B, a = ctx.saved_tensors
        grad_u = grad_u.to(x.dtype)
        grad_a = grad_u @ B.to(x.dtype)                                      # (..., r)
        grad_B = grad_u.reshape(-1, grad_u.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        grad_A = grad_a.reshape(-1, grad_a.shape[-1]).T @ (x * keep / (1.0 - ctx.p)).reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_a @ A.to(x.dtype)) * keep / (1.0 - ctx.p)).to(ctx.x_dtype)
        return grad_x, None, grad_A.to(A.dtype), grad_B.to(B.dtype), None


class LoRALinear(nn.Module):
    r"""A linear layer y = W·x + b, frozen, plus a trainable rank-r update:

        y = W·x + b + s · B·A·dropout(x),     s = α / r      (or α / √r with `use_rslora`)

    Shapes (x: (..., in), y: (..., out)):
        W: (out, in) and b: (out,)  the base weights, frozen; kept as this module's own `weight`/`bias`
        A: (r, in)                  `lora_A.weight`, projects x down to r numbers
        B: (out, r)                 `lora_B.weight`, projects them back up
    so B·A is an (out, in) matrix of rank ≤ r, and training it costs r·(in + out) parameters instead of in·out.

    Initialisation (`init`, PEFT's `init_lora_weights`):
        True        A ~ Kaiming-uniform(a=√5) (nn.Linear's default, i.e. U(-1/√in, 1/√in)), B = 0
        "gaussian"  A ~ Normal(0, std=1/r), B = 0  (what the original Oh-LoRA adapter was trained with)
        False       A and B both Kaiming-uniform: the adapter changes the output from step 0 (for tests)
    B starts at zero so that B·A = 0: a fresh adapter leaves the model's outputs exactly as they were, and
    training starts from the pretrained model. A must *not* be zero too, or the gradient of B (which is
    s·grad_y·(A·x)ᵀ) would be zero and nothing would ever learn.

    The scale s = α/r decouples the step size from r: with α fixed, doubling r does not double the size of the
    update, so a learning rate tuned at one r roughly carries over. rsLoRA (Kalajdzievski, 2023) argues that
    α/r shrinks the update too much at large r and uses s = α/√r instead.

    Parameter names: W and b stay this module's `weight` and `bias` (no `base_layer.` in between, unlike PEFT),
    so every base key of the model's state_dict is unchanged by injection; the adapter adds
    `<name>.lora_A.weight` and `<name>.lora_B.weight`, exactly PEFT's saved key names.

    dtypes: the adapter may be kept in a wider dtype than the base (default: fp32 adapter on a bf16/fp16
    base, as PEFT does), because tiny updates to A and B vanish in bf16 rounding. Without autocast, forward
    casts x to the adapter dtype for the LoRA path and adds the (fp32) update into the base output, rounding
    the sum once to the base output's dtype. Under `torch.autocast` both matmuls run in autocast's dtype
    (autocast casts their inputs), so x is not cast.

    Merging: `merge()` adds s·B·A into W (computed in fp32, then rounded to W's dtype) so inference costs one
    plain matmul; `unmerge()` subtracts it again. In fp32 that round trip is exact to ~1e-7 relative; in
    bf16, W + Δ is rounded to 8 bits of mantissa, so W + Δ - Δ differs from W by up to one bf16 ulp of |W|+|Δ|.
    While merged, the LoRA path is skipped (it is already in W) and A, B get no gradients.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: bool | str = True, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base Parameters themselves (not copies): same storage, same device, works on the meta device.
        self.weight = base.weight                                   # (out, in)
        self.register_parameter("bias", base.bias)                  # (out,) or None
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.init = check_init(init)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # Adapter dtype: at least fp32 (bf16 base -> fp32 adapter; fp64 base -> fp64 adapter).
        dtype = adapter_dtype or torch.promote_types(base.weight.dtype, torch.float32)
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)   # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # weight (out, r)
        self.merged = False
        if self.init is not False:   # init=False keeps nn.Linear's own Kaiming-uniform init of A and B (PEFT too)
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """(Re)initialise A and B as described by `init` (PEFT's `init_lora_weights`)."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if self.init is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x: (..., in)
        y = F.linear(x, self.weight, self.bias)                      # (..., out), base dtype
        if self.merged:                                              # s·B·A already lives inside W
            return y
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)                        # no-op when the dtypes agree
        if self.training and self.dropout > 0.0:
            keep, p = dropout_keep_mask(x.shape, self.dropout, x.device)
            update = DroppedLoRAUpdate.apply(x, keep, self.lora_A.weight, self.lora_B.weight, p)
        else:
            update = self.lora_B(self.lora_A(x))                     # (..., r) -> (..., out); B·A never formed
        return y.add_(update, alpha=self.scaling)                    # y += s·update: one fused kernel, and
        #   the sum is computed in the wider dtype and rounded once into y's dtype. In place is safe: the
        #   backward of F.linear needs x and W, not its output y.

    def delta_weight(self) -> torch.Tensor:
        """s·B·A as an (out, in) matrix, computed in fp32 (or wider, for fp64 adapters)."""
        dtype = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s·B·A (rounded to W's dtype). Forward then costs exactly one nn.Linear."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged")
        self.weight.add_(self.delta_weight())   # summed in fp32, rounded once into W's dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s·B·A: undo `merge()` (exact up to rounding in W's dtype; see the class docstring)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + s·B·A (just W if already merged); this layer is left unchanged."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")  # no allocation
        if self.merged:
            linear.weight = self.weight
        else:
            w = self.weight.detach().clone().add_(self.delta_weight())     # as merge(): one rounding
            linear.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        linear.register_parameter("bias", self.bias)
        return linear

    def extra_repr(self) -> str:
        scale = f"α/√r={self.scaling:g}" if self.use_rslora else f"α/r={self.scaling:g}"
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, {scale}, "
                f"dropout={self.dropout:g}, merged={self.merged}")
