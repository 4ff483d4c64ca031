"""Loss truncation against a self-reference: drop the tokens a model fine-tuned on the same data still cannot fit.

A first, plain-SFT run on the training data gives the reference. Deep networks fit the tokens that agree with the
rest of the data first and the ones that contradict it (corrupted, mislabelled) last, so after that run the
reference's loss is a noise detector from the first step of the second run (measured: docs/selectors.md). Once,
before the second run, every response token gets L_ref; a token is dropped when

    L_ref(x_i) > c * log(V)    (the reference, after training on it, rates it below a uniform guess over V tokens)

at most the 1 - rho share of the pool with the highest L_ref, and never the last token of a response span (its
`</s>` / end of turn). Every other label is kept; plain SFT on the relabelled data follows (selector "full").
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn

from sstoken_trl.selection.equations import kept_count
from sstoken_trl.selection.pool import relabel, response_log_probs


def truncation_keep(ref_loss: torch.Tensor, ends: torch.Tensor, select_ratio: float, threshold: float) -> torch.Tensor:
    """Keep mask over the pool: drop L_ref > threshold, highest first, at most N - ceil(rho N), never an end."""
    if not 0.0 < select_ratio <= 1.0:
        raise ValueError(f"select_ratio={select_ratio} must be in (0, 1]: at least that share of tokens is kept.")
    most = ref_loss.numel() - int(kept_count(torch.tensor(ref_loss.numel()), select_ratio))
    suspect = (ref_loss > threshold) & ~ends
    order = torch.sort(torch.where(suspect, ref_loss, -torch.inf), descending=True, stable=True).indices
    drop = torch.zeros_like(suspect)
    drop[order[:most]] = True
    return ~(drop & suspect)


def truncate_tokens(
    dataset: Dataset,
    reference_model: nn.Module,
    select_ratio: float = 0.8,
    loss_threshold: float = 1.0,
    batch_size: int = 8,
) -> tuple[Dataset, float]:
    """`dataset` with the labels of the tokens the reference cannot fit set to -100; (dataset, share kept).

    `reference_model`: the model after a plain-SFT run on this dataset. `loss_threshold` c: a token is suspect when
    L_ref > c * log(vocab size). At least ceil(rho * N) of the N response tokens are kept.
    """
    logp, counts, ends = response_log_probs(dataset, reference_model, batch_size)
    vocab_size = reference_model.get_output_embeddings().weight.size(0)
    keep = truncation_keep(-logp, ends, select_ratio, loss_threshold * math.log(vocab_size))
    return relabel(dataset, keep, counts, "loss-truncation"), keep.sum().item() / keep.numel()


__all__ = ["truncate_tokens", "truncation_keep"]
