"""The SFT loss on the causal-LM contract (core/causal_lm.py): next-token cross-entropy on the answer only.

Speed: the transformer runs once (`model.hidden_states`), the hidden states of the positions that carry a
label (the answer) are gathered, and the LM head (`model.logits`) + cross-entropy run only there, in chunks —
never a (B, T, vocab) logits tensor (Gemma's vocabulary is 262k). Right padding with causal attention means
real tokens never see a pad, so no attention mask is passed (SDPA's causal fast path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data.sft import IGNORE_INDEX


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions only.

    input_ids, labels: (B, T), right-padded; labels[b, t] = -100 where no loss. Position t predicts token t+1:
        hidden = model.hidden_states(input_ids[:, :-1])  (B, T-1, H)
        keep   = labels[:, 1:] != -100                   (B, T-1)
        h      = hidden[keep]                            (N, H)   N = answer tokens in the batch
        loss   = Σ CE(model.logits(h), labels[:, 1:][keep])  over chunks of ≤ `chunk` rows, logits in fp32
    Returns (loss_sum, N). Equal to F.cross_entropy over the full logits with ignore_index=-100, times N.
    """

    def __init__(self, model: torch.nn.Module, chunk: int = 1024):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        # attention_mask is not needed: pads sit on the right and attention is causal (see module doc).
        # The last column predicts nothing (causal: no earlier position needs it either), so it is not fed.
        hidden = self.model.hidden_states(input_ids[:, :-1])        # (B, T-1, H)
        targets = labels[:, 1:]                                     # (B, T-1)
        keep = targets != IGNORE_INDEX
        h = hidden[keep]                                            # (N, H)
        y = targets[keep]                                           # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, y.numel(), self.chunk):
            logits = self.model.logits(h[s:s + self.chunk]).float()     # (n, V) (soft-capped if the family does)
            total = total + F.cross_entropy(logits, y[s:s + self.chunk], reduction="sum")
        return total, int(y.numel())
