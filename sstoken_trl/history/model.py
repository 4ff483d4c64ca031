"""history="model": a separate frozen model (full fine-tuning without PEFT, or RHO-1's reference)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from sstoken_trl.history.source import Forward, HistoryContext, HistorySource
from sstoken_trl.tools.loading import resolve_model
from sstoken_trl.trl_internals import add_fused_lm_head, has_fused_head


class ModelHistory(HistorySource):
    """A separate frozen model, given as an instance or loaded from a path (a folder, hub id or GGUF file) in the
    trained model's dtype."""

    def __init__(self, model: PreTrainedModel | str, like: PreTrainedModel) -> None:
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=like.dtype)
        model = model.to(like.device).eval().requires_grad_(False)
        if not has_fused_head(model):
            add_fused_lm_head(model)
        self.model = model

    @classmethod
    def from_context(cls, context: HistoryContext) -> ModelHistory:
        if context.history_model is None:
            raise ValueError("history='model' needs a history model: pass history_model=<path or model>.")
        return cls(context.history_model, like=context.inner)

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**inputs, fused_lm_head=True).log_probs
