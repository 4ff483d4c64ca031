"""A pre-hook on one attention module that scores attention-to-prompt inside the training forward.

The hook runs inside the layer's own forward, so FSDP / ZeRO-3 have the layer's weights gathered. It reads the
layer's q and k from its call to transformers' attention registry (`adapters.dispatch`): as the training forward
makes it (passed on unchanged to the model's own attention implementation), or from a no-grad recompute when
dropout inside the layer is active. It is armed for one forward at a time and disarms itself after firing: the
gradient-checkpoint recompute of the layer during backward does not score again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sstoken_trl.adapters import attention_modules, get_adapter
from sstoken_trl.adapters.dispatch import intercept, model_attention, record_attn_call
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.dropout import dropout_off
from sstoken_trl.scoring.attn_score import BACKENDS, AttnCall
from sstoken_trl.scoring.layout import Layout


class AttnScoreHook:
    """Computes AttnScore (B, T) at `attn_module` during the next forward after `arm`."""

    def __init__(self, attn_module: nn.Module, backend: str) -> None:
        self.attn_module = attn_module
        self.score_fn = BACKENDS[backend]
        self._layout: Layout | None = None
        self._score: torch.Tensor | None = None
        self.last_window: int | None = None  # the sliding window the last scored call passed (None: global layer)
        self.always_recompute = False  # score from a recompute even when the training forward could be read
        self._undo: Callable[[], None] | None = None
        self._handles = [
            attn_module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            attn_module.register_forward_hook(self._post_forward, always_call=True),
        ]

    def arm(self, layout: Layout) -> None:
        self._layout, self._score = layout, None

    def take(self) -> torch.Tensor:
        """The score of the last armed forward; raises if the hooked layer did not run."""
        score, self._score, self._layout = self._score, None, None
        if score is None:
            raise RuntimeError("the hooked attention layer did not run during the forward: no AttnScore computed.")
        return score

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._post_forward()
        self._layout = self._score = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Without active dropout in the module, score the training forward's own attention call as it passes;
        with it, score a no-grad, dropout-off recompute of the module up to its attention call."""
        if self._layout is None:
            return
        layout, self._layout = self._layout, None

        def score(call: AttnCall) -> None:
            with torch.no_grad(), torch.autocast(call.query.device.type, enabled=False):
                self._score = self.score_fn(call, layout)
            self.last_window = call.sliding_window

        pass_on = None if self.always_recompute or has_active_dropout(module) else model_attention(module)
        if pass_on is not None:
            self._undo = intercept(module, score, pass_on)
            return
        with torch.no_grad(), dropout_off(module):
            record_attn_call(module, args, kwargs, score)

    def _post_forward(self, *args: Any) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def has_active_dropout(module: nn.Module) -> bool:
    """Whether a dropout layer inside `module` (LoRA dropout included) would change its q or k now."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def hook_scoring_layer(model: nn.Module, config: SSTokenConfig) -> AttnScoreHook:
    """Hook the attention module of decoder layer `config.attn_layer` of a causal LM (the one under PEFT)."""
    get_adapter(model.config.model_type)  # an unsupported family stops here, naming the supported ones
    modules = attention_modules(model)
    return AttnScoreHook(modules[config.layer_index(len(modules))], config.attn_backend)
