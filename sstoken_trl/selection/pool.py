"""One no-grad pass of a frozen model over a pretokenized pool, and relabelling the pool: what the offline
selections (token_cleaning.py, loss_truncation.py) share.

Log-probs come from TRL's fused LM head in no-grad batches with dropout off: no full-vocabulary logits are kept,
and the pool holds one float per response token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.dropout import dropout_off
from sstoken_trl.selection.equations import response_ends
from sstoken_trl.trl_internals import add_fused_lm_head, fused_model, has_fused_head


@contextmanager
def fused_head(model: nn.Module) -> Iterator[nn.Module]:
    """The model (the one under PEFT) with TRL's fused LM head; a head installed here is removed after the block."""
    inner = fused_model(model)
    installed = not has_fused_head(inner)
    if installed:
        add_fused_lm_head(inner)
    try:
        with torch.no_grad(), dropout_off(inner):
            yield inner
    finally:
        if installed:
            del inner.forward


def padded_batch(
    rows_ids: list[list[int]], rows_labels: list[list[int]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels of one batch."""
    length = max(len(ids) for ids in rows_ids)
    input_ids = torch.zeros((len(rows_ids), length), dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        if len(ids) != len(lab):
            raise ValueError(f"A row has {len(ids)} input_ids but {len(lab)} labels: they must have the same length.")
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attention_mask[b, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def response_log_probs(
    dataset: Dataset, model: nn.Module, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of every response token of `dataset` under `model`, flattened over the pool (float32, CPU).

    Returns (log-probs, per-row count of response tokens, which tokens end a response span). A response token is
    a target position t + 1 whose label is not -100 (position 0 predicts nothing). Raises on a NaN log-prob.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"Cleaning needs a pretokenized dataset with input_ids and labels (-100 off the responses); "
            f"it has no {sorted(missing)} column. Run sstoken_trl.pretokenize(dataset, tokenizer) first."
        )
    log_probs, counts, ends = [], [], []
    with fused_head(model) as fused:
        device = fused.get_input_embeddings().weight.device
        for chunk in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=batch_size):
            batch = padded_batch(chunk["input_ids"], chunk["labels"], device)
            logp = fused(**batch, fused_lm_head=True).log_probs.float().cpu()
            response = batch["labels"][:, 1:].cpu() != IGNORE_INDEX
            log_probs.append(logp[response])
            counts.append(response.sum(dim=1))
            ends.append(response_ends(response, torch.zeros_like(response, dtype=torch.long))[response])
    flat = torch.cat(log_probs) if log_probs else torch.zeros(0)
    if flat.numel() == 0:
        raise ValueError(
            "Cleaning: the dataset has no response token (every label is -100, or the only labelled token is the "
            "first one). Labels must mark the responses: pretokenize the samples with sstoken_trl.pretokenize."
        )
    if flat.isnan().any():
        raise ValueError(
            "Cleaning: a response token has a NaN log-prob (the model gives NaN; dtype overflow or broken weights). "
            "Check the model before cleaning."
        )
    return flat, torch.cat(counts), torch.cat(ends)


def relabel(dataset: Dataset, keep: torch.Tensor, counts: torch.Tensor, name: str) -> Dataset:
    """`dataset` with the label of every response token not in `keep` (flat over the pool) set to -100."""
    offsets = torch.cumsum(counts, 0) - counts
    keep_list, offset_list = keep.tolist(), offsets.tolist()

    def clean(example: dict[str, Any], index: int) -> dict[str, Any]:
        labels, out, j = example["labels"], [IGNORE_INDEX] * len(example["labels"]), offset_list[index]
        for t in range(1, len(labels)):
            if labels[t] != IGNORE_INDEX:
                if keep_list[j]:
                    out[t] = labels[t]
                j += 1
        return {"labels": out}

    digest = hashlib.blake2b(keep.numpy().tobytes(), digest_size=8).hexdigest()
    fingerprint = hashlib.blake2b(f"{dataset._fingerprint}/{name}/{digest}".encode(), digest_size=8)
    return dataset.map(clean, with_indices=True, new_fingerprint=fingerprint.hexdigest())


def load_reference(path: str, like: PreTrainedModel) -> PreTrainedModel:
    """The reference model from a path or hub id, in `like`'s dtype and on its device, frozen."""
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(like.get_input_embeddings().weight.device).eval().requires_grad_(False)
