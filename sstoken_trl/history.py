"""Where the history model's per-token log-probs come from.

Every source returns log p_his(x_i | x<i) on target positions (B, T-1), computed under no_grad through TRL's
fused LM head, so no full-vocabulary logits are kept.
- BaseHistory ("base"): the trained model itself with its PEFT adapters disabled, i.e. the base model, dropout off.
- ModelHistory ("model"): a separate frozen model (full fine-tuning without PEFT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl.trainer.utils import add_fused_lm_head

from sstoken_trl.hook import dropout_off

Forward = Callable[..., Any]


class HistorySource(Protocol):
    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor: ...


class BaseHistory:
    """The base model: the same weights with the PEFT adapters switched off, and dropout off (like every source)."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(
                "history='base' reads the base model by disabling PEFT adapters, but the model has none. "
                "Train with a peft_config (LoRA / QLoRA), or use history='model' with history_model=<path> "
                "(or history='ema') for full fine-tuning."
            )
        self.peft_model = model

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad(), dropout_off(self.peft_model), self.peft_model.disable_adapter():
            return forward(**inputs, fused_lm_head=True).log_probs


class ModelHistory:
    """A separate frozen model, given as an instance or loaded from a path in the trained model's dtype."""

    def __init__(self, model: PreTrainedModel | str, like: PreTrainedModel) -> None:
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=like.dtype)
        model = model.to(like.device).eval().requires_grad_(False)
        if "forward" not in vars(model):
            add_fused_lm_head(model)
        self.model = model

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**inputs, fused_lm_head=True).log_probs
