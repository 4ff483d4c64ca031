"""Independent references written from the paper: a plain per-sample loop and eager-attention scores."""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def reference_select(rel_values, attn, response, gamma, rho):
    """Per sample: min-max REL, Score = gamma REL' + (1-gamma) attn, keep top ceil(rho n), ties to earlier."""
    keep = torch.zeros_like(response)
    for b in range(response.size(0)):
        idx = [t for t in range(response.size(1)) if response[b, t]]
        if not idx:
            continue
        r = [rel_values[b, t].item() for t in idx]
        lo, hi = min(r), max(r)
        score = {
            t: gamma * (rel_values[b, t].item() - lo) / (hi - lo + 1e-8) + (1 - gamma) * attn[b, t].item() for t in idx
        }
        k = math.ceil(Fraction(str(rho)) * len(idx))
        for t in sorted(idx, key=lambda t: (-score[t], t))[:k]:
            keep[b, t] = True
    return keep


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x<=t) from full logits, on target positions (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def prompt_attention(attentions: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of each query on prompt tokens (real, unlabelled), (B, T)."""
    prompt = (labels == -100) & attention_mask.bool()
    return (attentions.float() * prompt[:, None, None, :]).sum(-1).mean(1)
