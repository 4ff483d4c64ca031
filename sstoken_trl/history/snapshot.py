"""history="snapshot": the trained weights as they were when the selection warm-up ended, frozen from then on.

After `select_warmup_ratio` of training on every token, the model has seen the task; REL = L_snapshot - L_cur
then measures what the model keeps learning from the data after that point. A token that agrees with what the
rest of the data teaches keeps improving, even while it is dropped; a token that contradicts it (a corrupted
label) does not, and one the snapshot already predicts (filler) has nothing left to gain. Against the base, REL
instead measures how surprised the base is, which on a task new to the base says little about the token.
Storage, the swap for a history forward and checkpointing are the EMA source's (alpha 0, one update).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sstoken_trl.history.ema import EMAHistory

if TYPE_CHECKING:
    from sstoken_trl.config import SSTokenConfig


class SnapshotHistory(EMAHistory):
    """A copy of the trainable weights taken after optimizer step `at_step`; never updated again."""

    def __init__(self, model: torch.nn.Module, at_step: int, on_cpu: bool = False) -> None:
        super().__init__(model, alpha=0.0, update_steps=max(at_step, 1), on_cpu=on_cpu)
        self.at_step = at_step

    @classmethod
    def build(cls, model: torch.nn.Module, config: SSTokenConfig, max_steps: int) -> SnapshotHistory:
        return cls(model, config.select_warmup(max_steps), config.ema_on_cpu)

    @torch.no_grad()
    def after_optimizer_step(self, global_step: int) -> None:
        """Copy the trained weights once, after the last warm-up step."""
        if global_step == self.at_step:
            super().after_optimizer_step(global_step)
