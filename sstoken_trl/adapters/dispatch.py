"""Read one attention layer's post-RoPE q and k exactly as the model computes them, for every family at once.

Every supported transformers attention module ends in one call to its attention function, looked up in
`ALL_ATTENTION_FUNCTIONS` by `config._attn_implementation`, with the layer's own q, k, scaling, sliding window,
softcap and sinks. `record_attn_call` runs the module's forward once more, with its config pointed at a recorder
registered there under `SCORING_ATTENTION`: the recorder keeps the call's arguments and stops the forward before
the value / output projections are used. The model's own attention implementation is left alone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from sstoken_trl.attn_score import AttnCall

SCORING_ATTENTION = "sstoken_attn_score"
CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values")
_recorders: dict[int, list[AttnCall]] = {}


class _Recorded(Exception):
    """Raised by the recorder to end the module's forward once q and k are known."""


def _record(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    calls = _recorders.get(id(module))
    if calls is None:
        raise RuntimeError(
            f"attn_implementation={SCORING_ATTENTION!r} only serves ssToken's scoring; load the model with "
            "'sdpa', 'eager' or 'flash_attention_2'."
        )
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    calls.append(AttnCall(query, key, scaling, sliding_window, softcap, s_aux))
    raise _Recorded


AttentionInterface.register(SCORING_ATTENTION, _record)


def record_attn_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> AttnCall:
    """Run `module.forward(*args, **kwargs)` up to its attention function and return that call's arguments.

    Runs as the caller set grad / dropout (the hook: no_grad, dropout off). A cache in the arguments is not updated.
    """
    if not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} has no `config`: it is not a transformers attention module.")
    kwargs = {name: None if name in CACHE_ARGUMENTS else value for name, value in kwargs.items()}
    config = module.config
    scoring_config = copy.copy(config)
    scoring_config._attn_implementation_internal = SCORING_ATTENTION
    calls = _recorders[id(module)] = []
    module.config = scoring_config
    try:
        module.forward(*args, **kwargs)
    except _Recorded:
        pass
    finally:
        module.config = config
        del _recorders[id(module)]
    if len(calls) != 1:
        raise RuntimeError(
            f"{type(module).__name__} did not compute its attention through transformers' attention function "
            f"registry (ALL_ATTENTION_FUNCTIONS); ssToken cannot read its queries and keys."
        )
    return calls[0]
