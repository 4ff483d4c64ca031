"""history="snapshot": the trained weights as they were when the selection warm-up ended, frozen from then on.

After `select_warmup_ratio` of training on every token, the model has seen the task; REL = L_snapshot - L_cur
then measures what the model keeps learning from the data after that point. A token that agrees with what the
rest of the data teaches keeps improving, even while it is dropped; a token that contradicts it (a corrupted
label) does not, and one the snapshot already predicts (filler) has nothing left to gain. Against the base, REL
instead measures how surprised the base is, which on a task new to the base says little about the token.
Storage, the swap for a history forward and checkpointing are the EMA source's (alpha 0, one update).
"""

from __future__ import annotations

import torch

from sstoken_trl.history.ema import EMAHistory
from sstoken_trl.history.source import HistoryContext


class SnapshotHistory(EMAHistory):
    """A copy of the trainable weights taken after optimizer step `at_step`; never updated again."""

    def __init__(self, model: torch.nn.Module, at_step: int, on_cpu: bool = False) -> None:
        super().__init__(model, alpha=0.0, update_steps=max(at_step, 1), on_cpu=on_cpu)
        self.at_step = at_step

    @classmethod
    def from_context(cls, context: HistoryContext) -> SnapshotHistory:
        trainer = context.require_trainer("snapshot")
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise ValueError("history='snapshot' copies whole parameters; FSDP and DeepSpeed shard them.")
        config = context.config
        snapshot = cls(context.model, config.select_warmup(trainer.state.max_steps), config.ema_on_cpu)
        folder = context.resume_folder()
        if folder is not None:
            snapshot.restore(folder)
        return snapshot

    @torch.no_grad()
    def after_optimizer_step(self, global_step: int) -> None:
        """Copy the trained weights once, after the last warm-up step."""
        if global_step == self.at_step:
            super().after_optimizer_step(global_step)
