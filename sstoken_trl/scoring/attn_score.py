"""AttnScore(x_i): head-averaged attention mass that token i's query puts on prompt tokens (paper Eq. 7).

Two backends compute the same number from one layer's post-RoPE q and k:
- "sdpa": fused attention whose value vector is the prompt indicator, so the output of row i IS the mass on
  prompt keys; memory O(T) per head, no (B, H, T, T) tensor.
- "eager": the paper's materialised softmax(QK^T / sqrt(d)) summed over prompt columns.
Both apply their own mask: causal, same document, real keys, and the layer's sliding window if it has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sstoken_trl.scoring.layout import Layout


def key_mask(layout: Layout, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j."""
    t = layout.doc.size(1)
    pos = torch.arange(t, device=layout.doc.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None] & (layout.doc[:, :, None] == layout.doc[:, None, :]) & layout.real[:, None, :]
    # Padding queries may see nothing; let them see themselves so no row is empty (their score is dropped).
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=pos.device)
    return allowed[:, None]


def _prompt_values(layout: Layout, like: torch.Tensor) -> torch.Tensor:
    """Value tensor (B, H_kv, T, d) whose every channel is 1 on prompt keys and 0 elsewhere."""
    return layout.prompt.to(like.dtype)[:, None, :, None].expand_as(like).contiguous()


def attn_score_sdpa(
    q: torch.Tensor, k: torch.Tensor, layout: Layout, scaling: float, window: int | None = None
) -> torch.Tensor:
    """(B, T) prompt attention mass per query, through scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(
        q,
        k,
        _prompt_values(layout, k),
        attn_mask=key_mask(layout, window),
        scale=scaling,
        enable_gqa=q.size(1) != k.size(1),
    )
    return out[..., 0].float().mean(dim=1) * layout.real


def attn_score_eager(
    q: torch.Tensor, k: torch.Tensor, layout: Layout, scaling: float, window: int | None = None
) -> torch.Tensor:
    """(B, T) prompt attention mass per query, from the materialised attention map (B, H, T, T)."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~key_mask(layout, window), torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1)
    return (probs * layout.prompt[:, None, None, :]).sum(-1).mean(dim=1) * layout.real


BACKENDS = {"sdpa": attn_score_sdpa, "eager": attn_score_eager}
