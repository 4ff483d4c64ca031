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
kept. Which step a batch trains in is not known when it is collated: accelerate's loader collates one batch
ahead, data-loader workers further, and a step counter shared with the collator is off by that depth (which also
changes across a resume). `on_step_begin` knows the step but comes after the count. So the collator always counts
the selection, and `mark_step` runs where the step is exact and the count not yet taken: when the trainer has
fetched the micro-batches of one optimizer step and is about to count them (trl_internals.before_token_count).
It counts every response token of a warm-up step and marks each batch with its step and warm-up rows. The
selective forward reads the marks through `take_warm_rows`, which refuses a batch marked for another step than
the one training it: count and selection agree by construction, or training stops with an error.
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
MARKED_STEP = "sstoken_step"


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

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        if "shift_labels" in batch:
            raise ValueError("ssToken does not support collators that emit pre-shifted `shift_labels`.")
        batch[REAL_LABELS] = batch["labels"]
        self._count(batch, None)
        return batch

    def mark_step(self, batches: list[dict[str, Any]], global_step: int) -> None:
        """Mark the micro-batches of optimizer step `global_step` (0-based) before the trainer counts their labels:
        in a warm-up step every response token is counted. Batches this wrapper did not collate are left alone."""
        warm = global_step < self.warmup_steps
        for batch in batches:
            if REAL_LABELS not in batch:
                continue
            labels = batch[REAL_LABELS]
            batch[WARMUP_ROWS] = torch.full((labels.size(0),), warm, device=labels.device)
            batch[MARKED_STEP] = global_step
            if warm:
                self._count(batch, batch[WARMUP_ROWS])

    def _count(self, batch: dict[str, Any], warm_rows: torch.Tensor | None) -> None:
        """Set `labels` to the real labels at the counted positions only."""
        labels = batch[REAL_LABELS]
        layout = batch_layout(labels, batch.get("attention_mask"), batch.get("position_ids"))
        counted = counted_tokens(layout, self.scope, self.select_ratio, warm_rows)
        batch["labels"] = torch.cat([labels[:, :1], labels[:, 1:].masked_fill(~counted, IGNORE_INDEX)], dim=1)


def take_warm_rows(inputs: dict[str, Any], global_step: int, warmup_steps: int) -> torch.Tensor | None:
    """Pop the marks `mark_step` left on a training batch; its warm-up rows (B,), None when there is no warm-up.
    Raises when a warm-up is configured and the batch was counted for another step than `global_step`."""
    rows, marked = inputs.pop(WARMUP_ROWS, None), inputs.pop(MARKED_STEP, None)
    if warmup_steps and marked != global_step:
        raise RuntimeError(
            f"A training batch was counted for optimizer step {marked} but trains in step {global_step}: the "
            "trainer no longer fetches and counts the micro-batches of a step where ssToken expects it "
            "(Trainer.get_batch_samples), so the selection warm-up cannot end at its step. This version of "
            "sstoken-trl supports transformers 5.x as of 5.24."
        )
    return rows
