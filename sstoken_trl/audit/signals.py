"""Per-token suspicion of a batch's response tokens, from the signals the selection reads.

Every signal is in nats and higher means more suspect, on target positions (B, T-1) as TRL's fused LM head gives
them (position t scores token t + 1):
  surprise       L_cur - H_cur under the model as given (with its adapter): the recommendation's own signal.
  surprise_base  L_base - H_base under the base model (adapter switched off).
  loss           L_cur, the model's loss on the token.
  base_loss      L_base, the base model's loss on the token.
  rel            -REL = L_cur - L_base: how much worse the adapted model predicts the token than the base; ssToken
                 keeps high REL, so what it leaves out first ranks high here.
Without an adapter only the base signals exist (the model is the base).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from peft import PeftModel

from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.equations import rel
from sstoken_trl.selection.selectors import Signals, surprise
from sstoken_trl.trl_internals import fused_model, has_fused_head

SIGNALS = {
    "surprise": "L_cur - H_cur under the adapted model: how much less likely the token is than the model expects",
    "surprise_base": "L_base - H_base under the base model (adapter off)",
    "loss": "L_cur, the adapted model's loss",
    "base_loss": "L_base, the base model's loss",
    "rel": "-REL = L_cur - L_base: how much worse the adapted model predicts the token than the base",
}
BASE_SIGNALS = ("surprise_base", "base_loss")
HEAD_OUTPUTS = ("log_probs", "entropy")  # what the fused LM head must compute for the audit


def available_signals(model: torch.nn.Module) -> tuple[str, ...]:
    """The signals this model gives: all of them with a PEFT adapter, the base ones without."""
    return tuple(SIGNALS) if isinstance(model, PeftModel) else BASE_SIGNALS


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], base: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, entropy) of every target position, with the adapter on, or off when `base`."""
    off = model.disable_adapter() if base and isinstance(model, PeftModel) else nullcontext()
    with off, torch.no_grad():
        out = fused_model(model)(**batch, fused_lm_head=True, use_cache=False)
    if out.entropy is None:
        raise ValueError(
            "The fused LM head computes no entropy: install it with "
            f"add_fused_lm_head(model, outputs={HEAD_OUTPUTS}) before loading the adapter."
        )
    return out.log_probs.float(), out.entropy.float()


def token_suspicion(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], names: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({signal: suspicion (B, T-1)} for `names` (default: every available signal), response mask (B, T-1)).

    One forward with the adapter and one without (only the one needed when `names` asks for one side)."""
    if not has_fused_head(model):
        raise ValueError(f"The model needs TRL's fused LM head: add_fused_lm_head(model, outputs={HEAD_OUTPUTS}).")
    names = names or available_signals(model)
    unknown = [n for n in names if n not in available_signals(model)]
    if unknown:
        have = ", ".join(available_signals(model))
        raise ValueError(f"Signals {unknown} need a PEFT adapter on the model (--adapter); without one: {have}.")
    layout = batch_layout(batch["labels"], batch.get("attention_mask"), batch.get("position_ids"))
    zeros = torch.zeros(layout.response.shape, device=layout.response.device)

    def surprise_of(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return surprise(Signals(layout, zeros, zeros, 1.0, 0, logp, 0, entropy))

    out: dict[str, torch.Tensor] = {}
    if any(n not in BASE_SIGNALS for n in names):
        logp_cur, entropy_cur = _forward(model, batch, base=False)
        out["surprise"], out["loss"] = surprise_of(logp_cur, entropy_cur), -logp_cur
    if any(n in BASE_SIGNALS or n == "rel" for n in names):
        logp_base, entropy_base = _forward(model, batch, base=True)
        out["surprise_base"], out["base_loss"] = surprise_of(logp_base, entropy_base), -logp_base
        if "loss" in out:
            out["rel"] = -rel(-out["loss"], logp_base)
    return {n: torch.where(layout.response, out[n], 0.0) for n in names}, layout.response
