"""Where a causal LM keeps its decoder layers and their attention, and which of those layers slide.

Nothing is looked up by family name: AttnScore comes from the scored layer's own call to transformers' attention
registry (`adapters.dispatch`), and the windows from what the model applies: `config.sliding_window` on the
"sliding_attention" layers of `config.layer_types` where the family's config has that field (Exaone 4 stores a
window on every layer but applies it there only), else the layer's own `sliding_window`, else the config's.
`TESTED_FAMILIES` lists the families tested in CI; any other one is checked on the spot when training starts
scoring it.
"""

from __future__ import annotations

from torch import nn

from sstoken_trl.adapters.families import TESTED_FAMILIES

LAYER_LISTS = ("layers", "h", "blocks")  # where decoders keep their layers (LLaMA-like, GPT-2 / Falcon, others)
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")  # LLaMA-like, GPT-NeoX, GPT-2, Falcon
SLIDING_LAYER_TYPE = "sliding_attention"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM (the model under PEFT), in order."""
    decoder = model.get_decoder()
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(
        f"ssToken found no list of decoder layers in {type(decoder).__name__} (looked for {', '.join(LAYER_LISTS)}): "
        "AttnScore cannot be read from this model; train it with a selector that uses no attention "
        "(full, random, rho1, loss_truncation) or with gamma=1."
    )


def attention_module(layer: nn.Module, index: int) -> nn.Module:
    """The attention module of one decoder layer, or a ValueError naming what the layer holds instead."""
    for name in ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    children = ", ".join(f"{n} ({type(c).__name__})" for n, c in layer.named_children())
    raise ValueError(
        f"decoder layer {index} ({type(layer).__name__}) has no attention module (looked for "
        f"{', '.join(ATTENTION_NAMES)}; it holds {children}): ssToken cannot score it. Pick another attn_layer, "
        "or train with gamma=1 or a selector that uses no attention (full, random, rho1, loss_truncation)."
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer of a causal LM (the model under PEFT), in layer order."""
    return [attention_module(layer, i) for i, layer in enumerate(decoder_layers(model))]


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer, the sliding window it applies (None: a global layer attending to every earlier token)."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) if declares(config, "layer_types") else None
    modules = attention_modules(model)
    if layer_types is not None:  # the family builds its masks from layer_types, whatever its layers store
        return [window if kind == SLIDING_LAYER_TYPE else None for kind in layer_types[: len(modules)]]
    return [getattr(module, "sliding_window", window) for module in modules]


def declares(config: object, name: str) -> bool:
    """Whether the config class of the family has the field `name` (not merely an extra key someone passed)."""
    return any(name in getattr(cls, "__annotations__", {}) for cls in type(config).__mro__)


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


__all__ = [
    "TESTED_FAMILIES",
    "attention_module",
    "attention_modules",
    "decoder_layers",
    "last_global_layer",
    "layer_windows",
]
