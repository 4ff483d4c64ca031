"""What an architecture adapter provides: which layers of a family use a sliding window, and how wide.

The queries and keys themselves are not recomputed per family: `adapters.dispatch` reads them, with the layer's
scaling, window, softcap and sinks, from the call the layer makes to transformers' attention function registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttnAdapter:
    sliding_window: Callable[[nn.Module], int | None]  # (attention module) -> keys within this many positions, or None
    notes: str = ""  # what differs in this family where AttnScore is computed


def no_window(attn: nn.Module) -> None:
    """Full causal attention on every layer."""
    return None


def config_window(attn: nn.Module) -> int | None:
    """`config.sliding_window` on every layer when it is set (Mistral, Mixtral, Phi-3)."""
    return getattr(attn.config, "sliding_window", None)


def layer_window(attn: nn.Module) -> int | None:
    """The module's own `sliding_window`: set on "sliding_attention" layers only."""
    return getattr(attn, "sliding_window", None)
