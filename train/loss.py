"""The SFT loss on the causal-LM contract (core/causal_lm.py): next-token cross-entropy on the answer only.

The transformer runs once (`model.hidden_states`); only the hidden states of the positions that carry a label
(the answer) reach the LM head — never a (B, T, vocab) logits tensor (Gemma's vocabulary is 262k). Right
padding with causal attention means real tokens never see a pad, so no attention mask is passed (SDPA's causal
fast path).

Head + cross-entropy, when the head is a frozen plain Linear (LoRA's default: no adapter on it), run fused in
cache-sized tiles (`fused_head_cross_entropy`): the loss and its gradient with respect to the hidden states
are computed in one pass over the vocabulary, with a running max like flash attention's softmax, so no
(N, V) logits, fp32 copy, log-softmax or logits gradient is ever written to memory (on 2 cores the plain path
spent 2/3 of the head's time on those, at a few GB/s) and nothing but an (N, H) gradient is kept for backward.
Otherwise (a trainable or adapted head) the plain path runs: logits in row chunks, autograd as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.causal_lm import CausalLM
from data.sft import IGNORE_INDEX

ROWS = 256           # hidden states per tile of the fused path
TILE_BYTES = 4 << 20  # fp32 logits per tile (fits L2/L3 with the weight slice): 256 rows x 4096 vocabulary entries
CHUNK_BYTES = 32 << 20  # plain path: fp32 logits per row chunk


@torch.no_grad()
def fused_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None,
                             need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Σ_i CE(z_i, y_i) and ∂/∂h, for z = softcap(h·Wᵀ) (logits rounded to the matmul's dtype, then fp32).

    h (N, H), weight W (V, H), y (N,). Per row, over vocabulary tiles b with a running max m and sum s:
        m' = max(m, max_b z),  s ← s·e^{m-m'} + Σ_b e^{z-m'},  g ← g·e^{m-m'} + (e^{z-m'} ⊙ ∂z/∂u)·W_b
    then  CE = m + log s - z_y  and  ∂CE/∂h = g / s - (∂z/∂u)_y · W_y,  where u = h·Wᵀ and ∂z/∂u = 1 - tanh²(u/cap)
    with a soft-cap (1 without): softmax(z) - onehot(y), pushed through the head, without forming softmax(z).
    Returns (loss sum as fp32 scalar, gradient (N, H) in h's dtype, or None when not `need_grad`)."""
    N, H = h.shape
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad = torch.empty_like(h) if need_grad else None
    for r0 in range(0, N, ROWS):
        hr, yr = h[r0:r0 + ROWS], y[r0:r0 + ROWS]
        n = hr.shape[0]
        block = max(256, TILE_BYTES // (4 * n))
        m = torch.full((n, 1), -float("inf"), device=h.device)
        s = torch.zeros(n, 1, device=h.device)
        z_y = torch.zeros(n, device=h.device)
        dz_y = torch.ones(n, device=h.device)
        g = torch.zeros(n, H, device=h.device) if need_grad else None
        for v0 in range(0, weight.shape[0], block):
            w = weight[v0:v0 + block]                                # (b, H)
            u = F.linear(hr, w)                                      # (n, b) in the matmul's dtype
            z = u.float()
            if softcap is not None:
                t = torch.tanh(z / softcap)                          # z = cap·t, ∂z/∂u = 1 - t²
                z = t * softcap
            hit = (yr >= v0) & (yr < v0 + w.shape[0])                # rows whose target is in this tile
            z_y[hit] = z[hit, yr[hit] - v0]
            m_new = torch.maximum(m, z.amax(-1, keepdim=True))
            rescale = torch.exp(m - m_new)                           # (n, 1)
            p = z.sub_(m_new).exp_()                                 # e^{z - m'}  (n, b), in place of z
            s = s * rescale + p.sum(-1, keepdim=True)
            if need_grad:
                if softcap is not None:
                    dz_y[hit] = 1.0 - t[hit, yr[hit] - v0] ** 2
                    p = p.mul_(1.0 - t * t)
                g.mul_(rescale).add_(p.to(u.dtype) @ w)              # (n, H)
            m = m_new
        total += (m.squeeze(1) + s.log().squeeze(1) - z_y).sum()
        if need_grad:
            w_y = weight[yr].float()                                 # (n, H)
            grad[r0:r0 + n] = (g / s - dz_y[:, None] * w_y).to(h.dtype)
    return total, grad


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """loss = fused_head_cross_entropy(h, W, y); backward: ∂L/∂h = grad_output · (the gradient from forward),
    exact because the loss is a sum (linear in each row's term). W gets no gradient (it must be frozen)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
        total, grad = fused_head_cross_entropy(h, weight, y, softcap)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def fusable_head(model: CausalLM) -> torch.nn.Linear | None:
    """The model's head (the contract's `head`) when the fused path applies: a plain, bias-free, frozen
    nn.Linear."""
    head = model.head
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return head
    return None


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions only.

    input_ids, labels: (B, T), right-padded; labels[b, t] = -100 where no loss. Position t predicts token t+1:
        hidden = model.hidden_states(input_ids[:, :-1])  (B, T-1, H)
        keep   = labels[:, 1:] != -100                   (B, T-1)
        h      = hidden[keep]                            (N, H)   N = answer tokens in the batch
        loss   = Σ CE(model.logits(h), labels[:, 1:][keep])      logits in fp32
    Returns (loss_sum, N). Equal to F.cross_entropy over the full logits with ignore_index=-100, times N.
    `chunk`: rows per chunk of the plain path (default: CHUNK_BYTES of fp32 logits); `fused=False` forces it.
    """

    def __init__(self, model: torch.nn.Module, chunk: int | None = None, fused: bool = True):
        super().__init__()
        self.model, self.fused = model, fused
        self.chunk = chunk or max(1, CHUNK_BYTES // (4 * model.config.vocab_size))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        # attention_mask is not needed: pads sit on the right and attention is causal (see module doc).
        # The last column predicts nothing (causal: no earlier position needs it either), so it is not fed.
        hidden = self.model.hidden_states(input_ids[:, :-1])        # (B, T-1, H)
        targets = labels[:, 1:]                                     # (B, T-1)
        keep = targets != IGNORE_INDEX
        h = hidden[keep]                                            # (N, H)
        y = targets[keep]                                           # (N,)
        head = fusable_head(self.model) if self.fused else None
        if head is not None:
            cap = self.model.logit_softcap
            if h.requires_grad:
                return _FusedHeadCrossEntropy.apply(h, head.weight, y, cap), int(y.numel())
            return fused_head_cross_entropy(h, head.weight, y, cap, need_grad=False)[0], int(y.numel())
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, y.numel(), self.chunk):
            logits = self.model.logits(h[s:s + self.chunk]).float()     # (n, V) (soft-capped if the family does)
            total = total + F.cross_entropy(logits, y[s:s + self.chunk], reduction="sum")
        return total, int(y.numel())
