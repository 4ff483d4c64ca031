"""Which tokens of a batch are real, prompt or response, and which sample (document) each belongs to.

A batch is either padded rows (`attention_mask`) or TRL's padding-free layout: one row of several documents,
`position_ids` restarting at each document and no `attention_mask`. Prompt tokens are real tokens without a
label; response tokens carry a label. Response quantities live on target positions (B, T-1): position t scores
token t + 1, the layout of TRL's fused LM head outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sstoken_trl.data.spans import IGNORE_INDEX


@dataclass
class Layout:
    real: torch.Tensor  # (B, T) bool: not padding
    doc: torch.Tensor  # (B, T) long: document index within the row (0 everywhere for padded rows)
    prompt: torch.Tensor  # (B, T) bool: real tokens without a label
    response: torch.Tensor  # (B, T-1) bool: target positions whose next-token label is trained

    def sample_ids(self) -> torch.Tensor:
        """(B, T-1) id of the sample (row, document) of each target position, unique over the batch."""
        rows = torch.arange(self.doc.size(0), device=self.doc.device)[:, None]
        return rows * self.doc.size(1) + self.doc[:, 1:]

    @property
    def sample_id_bound(self) -> int:
        """Upper bound on the sample ids (no host sync)."""
        return self.doc.numel()

    def segments(self, scope: str) -> tuple[torch.Tensor, int]:
        """Selection segment of each target position and a bound on their ids: its sample ("sample") or one
        segment for the whole micro-batch ("batch")."""
        if scope == "batch":
            return torch.zeros_like(self.response, dtype=torch.long), 1
        return self.sample_ids(), self.sample_id_bound

    def without_rows(self, rows: torch.Tensor | None) -> tuple[Layout, torch.Tensor]:
        """(this layout with the response of `rows` (B,) removed, those rows' response positions (B, T-1))."""
        if rows is None:
            return self, torch.zeros_like(self.response)
        taken = self.response & rows[:, None]
        return replace(self, response=self.response & ~taken), taken


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token: a new document starts wherever positions do not step by one."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).long().cumsum(-1)


def batch_layout(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Layout:
    """Layout of a collated batch. Documents are split by `position_ids` only when there is no attention_mask."""
    if attention_mask is not None:
        real = attention_mask.bool()
        doc = torch.zeros_like(labels)
    else:
        real = torch.ones_like(labels, dtype=torch.bool)
        doc = torch.zeros_like(labels) if position_ids is None else document_ids(position_ids)
    labelled = labels != IGNORE_INDEX
    return Layout(real=real, doc=doc, prompt=real & ~labelled, response=labelled[:, 1:] & real[:, 1:])
