"""Per-architecture access to one attention layer's post-RoPE queries and keys, keyed by `config.model_type`."""

from __future__ import annotations

from sstoken_trl.adapters.base import AttnAdapter
from sstoken_trl.adapters.llama import LLAMA
from sstoken_trl.adapters.mistral import MISTRAL
from sstoken_trl.adapters.qwen2 import QWEN2
from sstoken_trl.adapters.qwen3 import QWEN3

ADAPTERS: dict[str, AttnAdapter] = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3}


def get_adapter(model_type: str) -> AttnAdapter:
    """The adapter for `model_type`, or a ValueError naming the supported types."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"ssToken has no attention adapter for model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "AttnAdapter", "get_adapter"]
