"""Make the trainer count the tokens ssToken will keep, so its loss normalisation stays right.

The trainer divides the summed loss of a gradient-accumulation window by `num_items_in_batch`, the number of
labels in the window (gathered over ranks). ssToken keeps ceil(rho * n) of each sample's n response tokens,
a count known from the labels alone. The wrapped collator therefore emits `labels` with exactly that many
labels per sample (the first ones) and carries the real labels under `sstoken_labels`; the selective forward
swaps them back before computing log-probs. The loss becomes the mean NLL over kept tokens of the window,
correct under gradient accumulation and across processes, without touching the trainer. With
`rel_keep_threshold` the kept number is known only after the forward, so every response token is counted: the
loss is then the summed NLL of the kept tokens over all response tokens (dropped tokens weigh 0).

During the selection warm-up (the first `warmup_steps` optimizer steps) every response token is counted and
kept. The collator stamps each row with whether it was counted so (`sstoken_warmup`, read from the step the
callback last set, shared with data-loader worker processes); the selective forward keeps what the stamp says,
so count and selection agree even when batches are collated ahead of their step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.scoring.layout import Layout, batch_layout
from sstoken_trl.selection.equations import first_ratio

REAL_LABELS = "sstoken_labels"
WARMUP_ROWS = "sstoken_warmup"


def counted_tokens(layout: Layout, scope: str, select_ratio: float, warm_rows: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1) the positions the budget counts: ceil(rho * n) per segment, every response token of warm rows."""
    selected, warm = layout.without_rows(warm_rows)
    segment, num_segments = selected.segments(scope)
    return first_ratio(segment, selected.response, num_segments, select_ratio) | warm


class SelectionBudget:
    """Collate function wrapper: `labels` count the tokens that will be kept; real labels ride along."""

    def __init__(
        self, collate_fn: Callable[[list], dict[str, Any]], select_ratio: float, scope: str, warmup_steps: int = 0
    ) -> None:
        self.collate_fn = collate_fn
        self.select_ratio = select_ratio
        self.scope = scope
        self.warmup_steps = warmup_steps
        self.step = torch.zeros((), dtype=torch.long).share_memory_()  # seen by data-loader workers too

    def set_step(self, global_step: int) -> None:
        self.step.fill_(global_step)

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        if "shift_labels" in batch:
            raise ValueError("ssToken does not support collators that emit pre-shifted `shift_labels`.")
        labels = batch["labels"]
        layout = batch_layout(labels, batch.get("attention_mask"), batch.get("position_ids"))
        warm_rows = None
        if self.warmup_steps:
            warm_rows = torch.full((labels.size(0),), bool(self.step < self.warmup_steps), device=labels.device)
            batch[WARMUP_ROWS] = warm_rows
        counted = counted_tokens(layout, self.scope, self.select_ratio, warm_rows)
        batch[REAL_LABELS] = labels
        batch["labels"] = torch.cat([labels[:, :1], labels[:, 1:].masked_fill(~counted, IGNORE_INDEX)], dim=1)
        return batch
