"""Qwen2: biased q/k projections (handled by the Linear layers); sliding window per layer type."""

from torch import nn

from sstoken_trl.adapters.base import AttnAdapter, project_qk


def layer_window(attn: nn.Module) -> int | None:
    """The module's own `sliding_window`: set on "sliding_attention" layers only."""
    return getattr(attn, "sliding_window", None)


QWEN2 = AttnAdapter(query_key=project_qk, sliding_window=layer_window)
