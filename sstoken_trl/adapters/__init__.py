"""The decoder families ssToken scores, keyed by `config.model_type`, and which of their layers slide.

Queries and keys come from the layer's own call to transformers' attention registry (`adapters.dispatch`), the
same for every family; an adapter only says which layers use a sliding window, for choosing `attn_layer`.
"""

from __future__ import annotations

from torch import nn

from sstoken_trl.adapters.base import AttnAdapter
from sstoken_trl.adapters.families import (
    GEMMA2,
    GEMMA3_TEXT,
    GPT_OSS,
    GRANITE,
    MIXTRAL,
    OLMO2,
    PHI3,
    QWEN3_MOE,
    SMOLLM3,
)
from sstoken_trl.adapters.llama import LLAMA
from sstoken_trl.adapters.mistral import MISTRAL
from sstoken_trl.adapters.qwen2 import QWEN2
from sstoken_trl.adapters.qwen3 import QWEN3

ADAPTERS: dict[str, AttnAdapter] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3_TEXT,
    "phi3": PHI3,
    "olmo2": OLMO2,
    "mixtral": MIXTRAL,
    "qwen3_moe": QWEN3_MOE,
    "granite": GRANITE,
    "smollm3": SMOLLM3,
    "gpt_oss": GPT_OSS,
}


def get_adapter(model_type: str) -> AttnAdapter:
    """The adapter for `model_type`, or a ValueError naming the supported types."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"ssToken has no attention adapter for model_type={model_type!r}; supported: {', '.join(ADAPTERS)}."
        )
    return ADAPTERS[model_type]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer of a causal LM (the model under PEFT), in layer order."""
    return [layer.self_attn for layer in model.get_decoder().layers]


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, its sliding window (None: a global layer attending to every earlier token)."""
    adapter = get_adapter(model.config.model_type)
    return [adapter.sliding_window(attn) for attn in attention_modules(model)]


def last_global_layer(model: nn.Module) -> int:
    """Index of the last decoder layer without a sliding window: pass it as `attn_layer` to score a global layer."""
    windows = layer_windows(model)
    globals_ = [i for i, window in enumerate(windows) if window is None]
    if not globals_:
        raise ValueError(
            f"every layer of this {model.config.model_type} model uses a sliding window ({windows[-1]} tokens); "
            "there is no global layer: keep attn_layer=-1 or pick any layer."
        )
    return globals_[-1]


__all__ = ["ADAPTERS", "AttnAdapter", "attention_modules", "get_adapter", "last_global_layer", "layer_windows"]
