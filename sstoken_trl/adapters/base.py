"""What an architecture adapter provides: post-RoPE q and k of one attention module, and its window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

QueryKey = Callable[[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttnAdapter:
    query_key: QueryKey  # (attn, hidden_states, (cos, sin)) -> q (B, H, T, d), k (B, H_kv, T, d), after RoPE
    sliding_window: Callable[[nn.Module], int | None]  # keys within this many positions, or None


def project_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj / k_proj split into heads, optional per-head norm, then rotary embeddings."""
    heads = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(heads)
    k = attn.k_proj(hidden_states).view(heads)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def no_window(attn: nn.Module) -> None:
    return None
