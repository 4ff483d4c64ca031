"""What a history source is: log p_his on a batch, and do-nothing defaults for the rest of its lifecycle.

A source returns log p_his(x_i | x<i) on target positions (B, T-1), under no_grad, through TRL's fused LM head
(no full-vocabulary logits kept). Around that, the callback calls each hook of the lifecycle at its moment:
the train collate function is wrapped once at train start, batch fields the source added are stripped before the
training forward, `after_optimizer_step` runs after every optimizer step, `save` writes its state into each
checkpoint and `restore` reads it back when a run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from sstoken_trl.trl_internals import resume_checkpoint

if TYPE_CHECKING:
    from sstoken_trl.config import SSTokenConfig

Forward = Callable[..., Any]
Collate = Callable[[list], dict[str, Any]]


@dataclass
class HistoryContext:
    """What a source may be built from."""

    config: SSTokenConfig
    model: nn.Module  # the trained model: a PeftModel under PEFT
    inner: PreTrainedModel  # the model carrying TRL's fused LM head
    forward: Forward  # its fused-LM-head forward, before ssToken wraps it
    history_model: nn.Module | str | None = None  # for history="model"
    trainer: Trainer | None = None  # None outside training (sstoken-inspect)
    global_step: int = 0  # where training starts: above 0 when it resumes from a checkpoint
    max_steps: int | None = None  # the max_steps warm-up ratios are shares of; None: the trainer's

    def require_trainer(self, source: str) -> Trainer:
        if self.trainer is None:
            raise ValueError(f"history={source!r} keeps state over a training run; it needs a trainer.")
        return self.trainer

    def resume_folder(self) -> Path | None:
        """The checkpoint folder a resumed run starts from; None for a new run."""
        return resume_checkpoint() if self.global_step > 0 else None


class HistorySource:
    """Base class of the history sources; subclasses implement `log_probs` and the hooks they need."""

    def log_probs(self, forward: Forward, inputs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def wrap_collate(self, collate_fn: Collate) -> Collate:
        """The train collate function, wrapped if the source adds fields to each batch."""
        return collate_fn

    def strip_batch(self, inputs: dict[str, Any]) -> None:
        """Remove the fields this source added to a batch, before the model sees it."""

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after optimizer step `global_step`."""

    def save(self, folder: Path) -> None:
        """Write the source's state into a checkpoint folder."""

    def restore(self, folder: Path) -> None:
        """Read the state back from the checkpoint folder a run resumes from."""
