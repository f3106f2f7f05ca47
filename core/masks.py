"""Boolean attention masks for F.scaled_dot_product_attention."""
from __future__ import annotations

import torch


def attention_mask_for_sdpa(attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device,
                            sliding_window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """Return (mask, is_causal) for F.scaled_dot_product_attention; mask is bool (B|1, 1, T, past+T), True = attend.

    Without padding the cheap forms are used (is_causal for a fresh prompt, no mask for one new token).
    With padding every query may also attend to its own position, so the rows of left-padding queries (which
    see no real key) stay finite instead of NaN; those rows are padding and their outputs are ignored.
    With `sliding_window` a query at index i sees only keys j with i - window < j <= i (indices in the cached
    sequence, padding included, as HF counts them); the cheap forms are kept where the window cuts nothing.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    windowed = sliding_window is not None and past + T > sliding_window
    if not padded and T == 1 and not windowed:
        return None, False
    if not padded and past == 0 and not windowed:
        return None, True
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if windowed:
        causal &= k_pos[None, :] > q_pos[:, None] - sliding_window
    if not padded:
        return causal[None, None], False
    mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None], False
