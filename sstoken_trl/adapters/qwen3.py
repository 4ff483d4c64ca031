"""Qwen3: RMS norm on each query and key head before RoPE; sliding window per layer type, as Qwen2."""

import torch
from torch import nn

from sstoken_trl.adapters.base import AttnAdapter, project_qk
from sstoken_trl.adapters.qwen2 import layer_window


def qwen3_query_key(
    attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return project_qk(attn, hidden_states, position_embeddings, q_norm=attn.q_norm, k_norm=attn.k_norm)


QWEN3 = AttnAdapter(query_key=qwen3_query_key, sliding_window=layer_window)
