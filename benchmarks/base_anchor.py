"""The base anchor: every position the step does not fully train on pulled toward the base model's distribution.

A forgetting candidate (docs/forgetting.md): beside the selected tokens' NLL, the loss adds
`anchor_weight` x the mean KL(p_base || p_cur) over the anchored positions: the prompt's own next-token positions
(never trained by SFT, so free to drift) and the response tokens the selection left out or weighed below 1.
Where the model still predicts like the base the pull is zero; where training moved it off the base without the
data asking for it, the pull brings it back. The base is the model with its LoRA adapters disabled: one more
forward without gradient per micro-batch, and the LM head over the anchored positions of both models, in chunks.
With `prompt_only` only the prompt's positions are pulled: the responses never are, so the tokens a selection leaves
out stay free to move away from the base (its gain on noisy answers kept). Autograd keeps each chunk's log-probabilities
for the backward, so memory grows with anchored positions x vocabulary: right at this benchmark's size; at scale the
term would need a chunked backward of its own.

With `general` rows (token ids of general text no regime trains on: real chat exchanges), each step also pulls
the model toward the base on `general_batch` of them, every real position: `anchor_weight` x their mean KL, a term of
its own beside the task's (the task's loss and its normalisation untouched, unlike replay mixed into the batches,
which dilutes the task's tokens). The exact KL where replay trains on one draw from the base; the cost: a forward
without gradient and one with, on those rows. With `on_task=False` only the general rows are anchored.

The term is added through TRL's fused output: TRL's loss is -sum(log_probs) / num_items_in_batch over the trained
tokens, so the KL mean is subtracted from each trained token's log-prob (the sum moves by exactly the term).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import TrainerCallback

from sstoken_trl import SSTokenCallback
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.budget import REAL_LABELS
from sstoken_trl.trl_internals import fused_model

CHUNK = 256  # anchored positions per LM-head call
ANCHOR_WEIGHT = 1.0  # the KL term beside the NLL, both means per token
GENERAL_BATCH = 2  # general rows anchored per micro-batch: a quarter of the regimes' 8, as replay adds


def kl_to_base(h_base: torch.Tensor, h_cur: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Sum over positions of KL(p_base || p_cur), from the final hidden states (positions, hidden) of both."""
    total = h_cur.new_zeros(())
    for start in range(0, h_cur.shape[0], CHUNK):
        with torch.no_grad():
            logp_base = F.log_softmax(lm_head(h_base[start : start + CHUNK]).float(), dim=-1)
        logp_cur = F.log_softmax(lm_head(h_cur[start : start + CHUNK]).float(), dim=-1)
        total = total + (logp_base.exp() * (logp_base - logp_cur)).sum()
    return total


class BaseAnchor(TrainerCallback):
    """Installs the anchored loss at train start (after SSTokenCallback, whose selection it reads when given)."""

    def __init__(
        self,
        anchor_weight: float,
        sstoken: SSTokenCallback | None = None,
        prompt_only: bool = False,
        general: Sequence[Sequence[int]] = (),
        general_batch: int = GENERAL_BATCH,
        on_task: bool = True,
        seed: int = 0,
    ) -> None:
        if anchor_weight <= 0:
            raise ValueError(f"anchor_weight={anchor_weight} must be > 0: the weight of the KL to the base.")
        if general and not 0 < general_batch <= len(general):
            raise ValueError(f"general_batch={general_batch} must be in 1..{len(general)}, the general rows given.")
        if not on_task and not general:
            raise ValueError("on_task=False anchors nothing without general rows: pass general, or on_task=True.")
        self.anchor_weight, self.sstoken, self.prompt_only = anchor_weight, sstoken, prompt_only
        self.general, self.general_batch, self.on_task = [list(g) for g in general], general_batch, on_task
        self._order: list[int] = []  # general rows still to come this pass, drawn by `_rng`
        self._rng = random.Random(seed)
        self.positions: torch.Tensor | int = 0  # anchored positions over the run (a tensor: no host sync per step)
        self.general_positions: torch.Tensor | int = 0  # of them, on general rows
        self._restore: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        if not isinstance(model, PeftModel):
            raise ValueError(
                "The base anchor reads the base as the model with its adapters disabled, so it needs a PEFT model: "
                "pass a peft_config (LoRA) to the trainer."
            )
        inner = fused_model(model)
        backbone = getattr(inner, inner.base_model_prefix)
        forward = inner.forward

        def anchored(*a: Any, fused_lm_head: bool = False, **kw: Any) -> Any:
            labels = kw.get(REAL_LABELS, kw.get("labels"))
            if not fused_lm_head or labels is None:
                return forward(*a, fused_lm_head=fused_lm_head, **kw)
            inputs = {k: kw.get(k) for k in ("input_ids", "attention_mask", "position_ids")}
            h_base = None
            if self.on_task:
                with torch.no_grad(), model.disable_adapter():
                    h_base = backbone(**inputs).last_hidden_state
            captured: list[torch.Tensor] = []  # the last backbone call is the training forward's
            handle = backbone.register_forward_hook(lambda _m, _i, out: captured.append(out.last_hidden_state))
            try:
                out = forward(*a, fused_lm_head=True, **kw)
            finally:
                handle.remove()
            h_cur, head = captured[-1], inner.get_output_embeddings()
            term = h_cur.new_zeros(())
            if h_base is not None:
                mask = self._anchored(labels, inputs["attention_mask"], out.label_mask)
                kl, count = kl_to_base(h_base[:, :-1][mask], h_cur[:, :-1][mask], head), mask.sum()
                self.positions = self.positions + count
                term = term + self.anchor_weight * kl / count.clamp(min=1)
            if self.general:
                term = term + self.anchor_weight * self._general_kl(model, backbone, head, h_cur.device)
            log_probs = torch.where(out.label_mask, out.log_probs - term, out.log_probs)
            return replace(out, log_probs=log_probs)

        inner.forward = anchored
        # SSTokenCallback, before this one in the list, may have put its own forward back at train end already
        self._restore = lambda: vars(inner)["forward"] is anchored and vars(inner).__setitem__("forward", forward)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._restore is not None:
            self._restore()

    def _general_kl(
        self, model: PeftModel, backbone: torch.nn.Module, head: torch.nn.Module, device: torch.device
    ) -> torch.Tensor:
        """Mean KL(p_base || p_cur) over every real next-token position of the next `general_batch` general rows
        (each row once per pass, in an order drawn per pass), right-padded into one batch."""
        if len(self._order) < self.general_batch:
            self._order += self._rng.sample(range(len(self.general)), len(self.general))
        rows = [self.general[i] for i in self._order[: self.general_batch]]
        del self._order[: self.general_batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.no_grad(), model.disable_adapter():
            h_base = backbone(input_ids=ids, attention_mask=real).last_hidden_state
        h_cur = backbone(input_ids=ids, attention_mask=real).last_hidden_state
        mask = real[:, 1:].bool()  # position t predicts token t + 1: real when that token is
        count = mask.sum()
        self.positions = self.positions + count
        self.general_positions = self.general_positions + count
        return kl_to_base(h_base[:, :-1][mask], h_cur[:, :-1][mask], head) / count.clamp(min=1)

    def _anchored(
        self, labels: torch.Tensor, attention_mask: torch.Tensor | None, trained: torch.Tensor
    ) -> torch.Tensor:
        """Target positions (B, T-1) the step does not fully train on: the prompt's, and the responses' left out
        (with `prompt_only`, the prompt's alone)."""
        layout = batch_layout(labels, attention_mask)
        if self.prompt_only:
            return layout.real[:, 1:] & ~layout.response
        last = self.sstoken.last_selection if self.sstoken is not None else None
        full = trained if last is None or last.weight is None else trained & (last.weight >= 1)
        return layout.real[:, 1:] & ~(layout.response & full)
