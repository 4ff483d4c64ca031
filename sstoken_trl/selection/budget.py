"""Make the trainer count the tokens ssToken will keep, so its loss normalisation stays right.

The trainer divides the summed loss of a gradient-accumulation window by `num_items_in_batch`, the number of
labels in the window (gathered over ranks). ssToken keeps ceil(rho * n) of each sample's n response tokens,
a count known from the labels alone. The wrapped collator therefore emits `labels` with exactly that many
labels per sample (the first ones) and carries the real labels under `sstoken_labels`; the selective forward
swaps them back before computing log-probs. The loss becomes the mean NLL over kept tokens of the window,
correct under gradient accumulation and across processes, without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.equations import first_ratio

REAL_LABELS = "sstoken_labels"


class SelectionBudget:
    """Collate function wrapper: `labels` count the tokens that will be kept; real labels ride along."""

    def __init__(self, collate_fn: Callable[[list], dict[str, Any]], select_ratio: float, scope: str) -> None:
        self.collate_fn = collate_fn
        self.select_ratio = select_ratio
        self.scope = scope

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        if "shift_labels" in batch:
            raise ValueError("ssToken does not support collators that emit pre-shifted `shift_labels`.")
        labels = batch["labels"]
        layout = batch_layout(labels, batch.get("attention_mask"), batch.get("position_ids"))
        segment, num_segments = layout.segments(self.scope)
        counted = first_ratio(segment, layout.response, num_segments, self.select_ratio)
        batch[REAL_LABELS] = labels
        batch["labels"] = torch.cat([labels[:, :1], labels[:, 1:].masked_fill(~counted, IGNORE_INDEX)], dim=1)
        return batch
