"""history="base": the trained model itself with its PEFT adapters switched off, i.e. the base model."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from sstoken_trl.dropout import dropout_off
from sstoken_trl.history.source import Forward, HistoryContext, HistorySource


class BaseHistory(HistorySource):
    """The base model: the same weights with the PEFT adapters switched off, and dropout off (like every source)."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(
                "history='base' reads the base model by disabling PEFT adapters, but the model has none. "
                "Train with a peft_config (LoRA / QLoRA), or use history='model' with history_model=<path> "
                "(or history='ema') for full fine-tuning."
            )
        self.peft_model = model

    @classmethod
    def from_context(cls, context: HistoryContext) -> BaseHistory:
        return cls(context.model)

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad(), dropout_off(self.peft_model), self.peft_model.disable_adapter():
            return forward(**inputs, fused_lm_head=True).log_probs
