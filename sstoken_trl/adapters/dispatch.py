"""Read one attention layer's post-RoPE q and k exactly as the model computes them, for every family at once.

A transformers attention module that AttnScore can read ends in one call to its attention function, looked up in
`ALL_ATTENTION_FUNCTIONS` by `config._attn_implementation`, with the layer's own q, k, scaling, sliding window,
softcap and sinks. While the module's config is swapped for a copy naming `SCORING_ATTENTION`, that call reaches a
recorder registered there instead, which hands the arguments to a callback and then either
- passes the call on, unchanged, to the implementation the model was loaded with (`intercept`: scoring inside the
  training forward itself, no recompute), or
- stops the module's forward (`record_attn_call`: a recompute, for when dropout inside the module is active).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sstoken_trl.scoring.attn_score import AttnCall

SCORING_ATTENTION = "sstoken_attn_score"
CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values")
OnCall = Callable[[AttnCall], None]
AttentionFunction = Callable[..., Any]
_routes: dict[int, tuple[OnCall, AttentionFunction | None]] = {}  # id(module) -> (callback, pass on to / stop)


class _Recorded(Exception):
    """Raised by the recorder to end the module's forward once q and k are known."""


def _record(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
    route = _routes.get(id(module))
    if route is None:
        raise RuntimeError(
            f"attn_implementation={SCORING_ATTENTION!r} only serves ssToken's scoring; load the model with "
            "'sdpa', 'eager' or 'flash_attention_2'."
        )
    on_call, pass_on = route
    scaling = kwargs.get("scaling")
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    on_call(
        AttnCall(
            query.detach(),
            key.detach(),
            scaling,
            kwargs.get("sliding_window"),
            kwargs.get("softcap"),
            kwargs.get("s_aux"),
            value.detach(),
            attention_mask,
            kwargs,
        )
    )
    if pass_on is None:
        raise _Recorded
    return pass_on(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(SCORING_ATTENTION, _record)


def eager_attention(module: nn.Module) -> AttentionFunction | None:
    """The eager attention function of the module's modeling file (None if the file has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def model_attention(module: nn.Module) -> AttentionFunction | None:
    """The attention function the module calls as loaded: registry entry, or its file's eager function (or None)."""
    name = module.config._attn_implementation
    eager = eager_attention(module)
    if name in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS.get(name.removeprefix("paged|"), eager)


def _route(module: nn.Module, on_call: OnCall, pass_on: AttentionFunction | None) -> Callable[[], None]:
    """Swap the module's config for a copy that dispatches to the recorder; returns the undo."""
    if not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} has no `config`: it is not a transformers attention module.")
    config = module.config
    scoring_config = copy.copy(config)
    scoring_config._attn_implementation_internal = SCORING_ATTENTION
    _routes[id(module)] = (on_call, pass_on)
    module.config = scoring_config

    def undo() -> None:
        module.config = config
        _routes.pop(id(module), None)

    return undo


def intercept(module: nn.Module, on_call: OnCall, pass_on: AttentionFunction) -> Callable[[], None]:
    """Until the returned undo runs, the module's attention calls go through `on_call`, then on to `pass_on`."""
    return _route(module, on_call, pass_on)


def record_attn_call(module: nn.Module, args: tuple, kwargs: dict[str, Any], on_call: OnCall) -> int:
    """Run `module.forward(*args, **kwargs)` up to its attention function and hand that call to `on_call`.

    Runs as the caller set grad / dropout (the hook: no_grad, dropout off). A cache in the arguments is not updated.
    Returns the number of registry calls seen: 1, or 0 when the module computes attention some other way.
    """
    calls = 0

    def record(call: AttnCall) -> None:
        nonlocal calls
        calls += 1
        on_call(call)

    kwargs = {name: None if name in CACHE_ARGUMENTS else value for name, value in kwargs.items()}
    undo = _route(module, record, None)
    try:
        module.forward(*args, **kwargs)
    except _Recorded:
        pass
    finally:
        undo()
    return calls
