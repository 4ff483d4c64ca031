"""A pre-hook on one attention module that scores attention-to-prompt inside the training forward.

The hook runs inside the layer's own forward, so FSDP / ZeRO-3 have the layer's weights gathered. It reads the
layer's q and k from its call to transformers' attention registry (`adapters.dispatch`): as the training forward
makes it (passed on unchanged to the model's own attention implementation), or from a no-grad recompute when
dropout inside the layer is active. It is armed for one forward at a time and disarms itself after firing: the
gradient-checkpoint recompute of the layer during backward does not score again.

The gate is structural: a layer is scored when its forward makes exactly one registry call, with a mask that adds
no bias to the attention logits (ALiBi adds one there, which a score from q and k alone would miss).
`hook_scoring_layer` proves it with one tiny no-grad forward at train start, and every scored forward checks the
call count again (the mask: on the hook's first call). For a family
outside `TESTED_FAMILIES`, the first scored micro-batch is also checked against the layer's own eager attention
(`scoring.check`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sstoken_trl.adapters import TESTED_FAMILIES, attention_module, decoder_layers
from sstoken_trl.adapters.dispatch import intercept, model_attention, record_attn_call
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.dropout import dropout_off
from sstoken_trl.scoring.attn_score import BACKENDS, AttnCall
from sstoken_trl.scoring.check import CheckResult, check_attn_score
from sstoken_trl.scoring.layout import Layout, batch_layout


class AttnScoreHook:
    """Computes AttnScore (B, T) at `attn_module` during the next forward after `arm`."""

    def __init__(self, attn_module: nn.Module, backend: str, layer: int = -1) -> None:
        self.attn_module = attn_module
        self.layer = layer  # decoder layer index, for messages
        self.score_fn = BACKENDS[backend]
        self._layout: Layout | None = None
        self._score: torch.Tensor | None = None
        self.last_window: int | None = None  # the sliding window the last scored call passed (None: global layer)
        self.always_recompute = False  # score from a recompute even when the training forward could be read
        self.check_pending = False  # check the next score against the layer's own eager attention (once)
        self.check_result: CheckResult | None = None
        self._calls: int | None = None  # registry calls seen during the armed forward (None: not firing)
        self._mask_checked = False  # the first scored call's mask was checked for a logit bias
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

        self._calls = 0

        def score(call: AttnCall) -> None:
            self._calls += 1
            if self._calls > 1:
                return  # refused after the forward: a layer with several registry calls is not scored
            if not self._mask_checked:
                self._mask_checked = True
                if has_logit_bias(call.attention_mask):
                    raise ValueError(biased(module, self.layer))
            with torch.no_grad(), torch.autocast(call.query.device.type, enabled=False):
                self._score = self.score_fn(call, layout)
            if self.check_pending:  # the eager replay runs as the forward does, autocast included
                self.check_pending = False
                self.check_result = check_attn_score(module, call, layout, self._score, self.layer)
            self.last_window = call.sliding_window

        pass_on = None if self.always_recompute or has_active_dropout(module) else model_attention(module)
        if pass_on is not None:
            self._undo = intercept(module, score, pass_on)
            return
        with torch.no_grad(), dropout_off(module):
            record_attn_call(module, args, kwargs, score)
        self._check_calls(module)

    def _post_forward(self, module: nn.Module | None = None, args: Any = None, output: Any = None) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
            if output is not None:  # None: the forward raised, and that error is the one to see
                self._check_calls(module)
        self._calls = None

    def _check_calls(self, module: nn.Module) -> None:
        calls, self._calls = self._calls, None
        if calls != 1:
            self._score = None
            raise ValueError(unscorable(module, self.layer, calls))


def has_active_dropout(module: nn.Module) -> bool:
    """Whether a dropout layer inside `module` (LoRA dropout included) would change its q or k now."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def has_logit_bias(mask: Any) -> bool:
    """Whether an additive float mask holds anything but 0 (attend) and the dtype's minimum (masked): a bias."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return False
    return bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min)).any())


def biased(module: nn.Module, layer: int) -> str:
    return (
        f"ssToken cannot score decoder layer {layer} ({type(module).__name__}, model_type="
        f"{getattr(module.config, 'model_type', '?')!r}): the mask it hands to its attention function adds a bias "
        "to the attention logits (an ALiBi position bias, e.g. Falcon with alibi=True), which AttnScore, computed "
        "from the layer's q and k, does not include. Train with gamma=1 (rel_warmup 0) or a selector that uses no "
        "attention (full, random, rho1, loss_truncation)."
    )


def unscorable(module: nn.Module, layer: int, calls: int) -> str:
    found = "no call" if calls == 0 else f"{calls} calls"
    return (
        f"ssToken cannot score decoder layer {layer} ({type(module).__name__}, model_type="
        f"{getattr(module.config, 'model_type', '?')!r}): its forward made {found} into transformers' attention "
        "registry (ALL_ATTENTION_FUNCTIONS), and AttnScore is read from exactly one (a layer with linear attention, "
        "a state-space mixer, or its own attention code makes none). Pick another attn_layer whose attention goes "
        "through the registry, or train with gamma=1 (rel_warmup 0) or a selector that uses no attention "
        "(full, random, rho1, loss_truncation)."
    )


def hook_scoring_layer(model: nn.Module, config: SSTokenConfig, probe: bool = True) -> AttnScoreHook:
    """Hook the attention module of decoder layer `config.attn_layer` of a causal LM (the one under PEFT).

    With `probe`, one no-grad forward of a single 8-token row proves now that the layer can be scored (else every
    scored forward proves it: with parameters sharded by FSDP, as DTensors, a forward of the inner model alone is
    not possible, so it is skipped there whatever `probe` says). A family outside TESTED_FAMILIES gets the
    on-the-spot check on its first scored micro-batch.
    """
    layers = decoder_layers(model)
    layer = config.layer_index(len(layers))
    hook = AttnScoreHook(attention_module(layers[layer], layer), config.attn_backend, layer)
    if probe and not any(isinstance(p, DTensor) for p in model.parameters()):
        try:
            probe_forward(model, hook)
        except BaseException:
            hook.remove()
            raise
    hook.check_pending = model.config.model_type not in TESTED_FAMILIES
    return hook


def probe_forward(model: nn.Module, hook: AttnScoreHook, length: int = 8) -> None:
    """Score one row of `length` tokens (the first half prompt) under no_grad; raises if the layer cannot be."""
    device = model.get_input_embeddings().weight.device
    input_ids = torch.zeros((1, length), dtype=torch.long, device=device)
    labels = input_ids.clone()
    labels[:, : length // 2] = IGNORE_INDEX
    hook.arm(batch_layout(labels, torch.ones_like(input_ids)))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    hook.take()
