"""A pre-hook on one attention module that scores attention-to-prompt inside the training forward.

The hook runs inside the layer's own forward, so FSDP / ZeRO-3 have the layer's weights gathered, and it
leaves the main forward's attention implementation alone. It is armed for one forward at a time and disarms
itself after firing: the gradient-checkpoint recompute of the layer during backward does not score again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sstoken_trl.adapters import AttnAdapter, get_adapter
from sstoken_trl.attn_score import BACKENDS
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.layout import Layout


def _drops_out(module: nn.Module) -> bool:
    """A dropout layer, or an attention module whose forward applies `attention_dropout` while training."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    rate = getattr(module, "attention_dropout", None)
    return isinstance(rate, float) and rate > 0.0


@contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Put the dropout inside `module` (LoRA dropout and attention dropout included) in eval mode, then restore it.

    Only dropout is switched: dropout layers, and attention modules with `attention_dropout` > 0 (transformers
    applies it as a functional dropout that reads the module's own `training` flag; the flag is set on that module
    alone, not on its projections). Other layers keep their mode (4-bit layers, for one, repack weights in eval mode).
    """
    dropouts = [m for m in module.modules() if m.training and _drops_out(m)]
    for m in dropouts:
        m.training = False
    try:
        yield
    finally:
        for m in dropouts:
            m.training = True


class AttnScoreHook:
    """Computes AttnScore (B, T) at `attn_module` during the next forward after `arm`."""

    def __init__(self, attn_module: nn.Module, adapter: AttnAdapter, backend: str) -> None:
        self.attn_module = attn_module
        self.adapter = adapter
        self.score_fn = BACKENDS[backend]
        self._layout: Layout | None = None
        self._score: torch.Tensor | None = None
        self._handle = attn_module.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def arm(self, layout: Layout) -> None:
        self._layout, self._score = layout, None

    def take(self) -> torch.Tensor:
        """The score of the last armed forward; raises if the hooked layer did not run."""
        score, self._score, self._layout = self._score, None, None
        if score is None:
            raise RuntimeError("the hooked attention layer did not run during the forward: no AttnScore computed.")
        return score

    def remove(self) -> None:
        self._handle.remove()
        self._layout = self._score = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._layout is None:
            return
        layout, self._layout = self._layout, None
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        with torch.no_grad(), dropout_off(module):
            q, k = self.adapter.query_key(module, hidden_states, position_embeddings)
            self._score = self.score_fn(q, k, layout, module.scaling, self.adapter.sliding_window(module))


def hook_scoring_layer(model: nn.Module, config: SSTokenConfig) -> AttnScoreHook:
    """Hook the attention module of decoder layer `config.attn_layer` of a causal LM (the one under PEFT)."""
    adapter = get_adapter(model.config.model_type)
    layers = model.get_decoder().layers
    return AttnScoreHook(layers[config.layer_index(len(layers))].self_attn, adapter, config.attn_backend)
