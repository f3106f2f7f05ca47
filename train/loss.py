"""The SFT loss on the causal-LM contract (core/causal_lm.py): next-token cross-entropy on the answer only.

Speed: the transformer runs once (`model.hidden_states`), the hidden states of the positions that carry a
label (the answer) are gathered, and the LM head (`model.logits`) + cross-entropy run only there, in chunks —
never a (B, T, vocab) logits tensor (Gemma's vocabulary is 262k). Right padding with causal attention means
real tokens never see a pad, so no attention mask is passed (SDPA's causal fast path).

Memory: when the head is frozen (LoRA's default: no adapter on the head), each chunk's gradient with respect
to its hidden states is computed right away in the forward pass and its logits are freed (`_HeadCrossEntropy`):
autograd keeps an (N, H) gradient instead of every chunk's (n, V) logits, fp32 copy and log-softmax
(~10 bytes × N × V: 170 MB for 64 answer tokens of Gemma). Same arithmetic as the plain path, so the same loss
and gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from data.sft import IGNORE_INDEX

CHUNK_BYTES = 32 << 20  # fp32 logits per chunk: 32 rows of Gemma's 262k vocabulary, 273 of GPT-NeoX's 30.7k


class _HeadCrossEntropy(torch.autograd.Function):
    """Σ CE(logits(h), y) with d/dh computed chunk by chunk in forward; backward only scales it.

        forward:  for each chunk c:  loss_c = Σ CE(logits(h_c).float(), y_c);  g_c = ∂loss_c/∂h_c
        backward: ∂L/∂h = grad_output · [g_1; g_2; ...]          (the loss is a sum: linear in each chunk)
    `logits` must use no parameter that requires grad (they would get no gradient)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, logits: Callable, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        for s in range(0, y.numel(), rows):
            with torch.enable_grad():
                h_c = h[s:s + rows].detach().requires_grad_()
                loss_c = F.cross_entropy(logits(h_c).float(), y[s:s + rows], reduction="sum")
                grad[s:s + rows], = torch.autograd.grad(loss_c, h_c)
            total += loss_c.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad, = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions only.

    input_ids, labels: (B, T), right-padded; labels[b, t] = -100 where no loss. Position t predicts token t+1:
        hidden = model.hidden_states(input_ids[:, :-1])  (B, T-1, H)
        keep   = labels[:, 1:] != -100                   (B, T-1)
        h      = hidden[keep]                            (N, H)   N = answer tokens in the batch
        loss   = Σ CE(model.logits(h), labels[:, 1:][keep])  over chunks of `chunk` rows, logits in fp32
    Returns (loss_sum, N). Equal to F.cross_entropy over the full logits with ignore_index=-100, times N.
    `chunk` defaults to CHUNK_BYTES of fp32 logits.
    """

    def __init__(self, model: torch.nn.Module, chunk: int | None = None):
        super().__init__()
        self.model = model
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
        head = getattr(self.model, self.model.HEAD)
        if h.requires_grad and not any(p.requires_grad for p in head.parameters()):
            return _HeadCrossEntropy.apply(h, y, self.model.logits, self.chunk), int(y.numel())
        total = hidden.new_zeros((), dtype=torch.float32)           # trainable head, or no gradient at all
        for s in range(0, y.numel(), self.chunk):
            logits = self.model.logits(h[s:s + self.chunk]).float()     # (n, V) (soft-capped if the family does)
            total = total + F.cross_entropy(logits, y[s:s + self.chunk], reduction="sum")
        return total, int(y.numel())
