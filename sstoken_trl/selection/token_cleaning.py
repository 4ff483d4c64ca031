"""TokenCleaning (Pang et al. 2025, arXiv:2502.01968), fixed-model variant: the paper's strongest prior baseline.

Before training, every response token of the pool gets an influence score
    influence(x_i) = L_base(x_i) - L_ref(x_i) = log p_ref(x_i | x<i) - log p_base(x_i | x<i),
the loss a reference model (one that has seen good data of the task) removes from the base model. The top
ceil(rho * N) tokens of the WHOLE pool of N response tokens are kept (not a share per sample, as ssToken and
RHO-1 do); every other token's label becomes -100. Plain SFT on the cleaned labels follows (the callback's
selector "full", or SFTTrainer without it). Ties go to the earlier token (row order, then position).

Log-probs come from TRL's fused LM head in no-grad batches with dropout off: no full-vocabulary logits are kept,
and the pool holds one float per response token.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from fractions import Fraction
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTConfig

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.data.spans import IGNORE_INDEX
from sstoken_trl.dropout import dropout_off
from sstoken_trl.trl_internals import add_fused_lm_head, fused_model, has_fused_head


@contextmanager
def _fused_head(model: nn.Module) -> Iterator[nn.Module]:
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


def _padded(rows_ids: list[list[int]], rows_labels: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
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


def token_influence(
    dataset: Dataset, base_model: nn.Module, reference_model: nn.Module, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """influence = L_base - L_ref of every response token of `dataset`, flattened over the pool (float32, CPU).

    Returns (influence, per-row count of response tokens). A response token is a target position t + 1 whose
    label is not -100 (position 0 predicts nothing). Raises on a NaN influence.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"TokenCleaning needs a pretokenized dataset with input_ids and labels (-100 off the responses); "
            f"it has no {sorted(missing)} column. Run sstoken_trl.pretokenize(dataset, tokenizer) first."
        )
    scores, counts = [], []
    with _fused_head(base_model) as base, _fused_head(reference_model) as reference:
        base_device = base.get_input_embeddings().weight.device
        ref_device = reference.get_input_embeddings().weight.device
        for chunk in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=batch_size):
            batch = _padded(chunk["input_ids"], chunk["labels"], base_device)
            logp_base = base(**batch, fused_lm_head=True).log_probs.float().cpu()
            batch = {k: v.to(ref_device) for k, v in batch.items()}
            logp_ref = reference(**batch, fused_lm_head=True).log_probs.float().cpu()
            response = batch["labels"][:, 1:].cpu() != IGNORE_INDEX
            scores.append((logp_ref - logp_base)[response])
            counts.append(response.sum(dim=1))
    influence = torch.cat(scores) if scores else torch.zeros(0)
    if influence.isnan().any():
        raise ValueError(
            "TokenCleaning: a response token has a NaN influence (the base or the reference model gives NaN "
            "log-probs). Check both models (dtype overflow, broken weights) before cleaning."
        )
    return influence, torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)


def global_top_ratio(influence: torch.Tensor, select_ratio: float) -> torch.Tensor:
    """Keep mask over the pool: the top ceil(rho * N) influences, ties to the earlier token."""
    if not 0.0 < select_ratio <= 1.0:
        raise ValueError(f"select_ratio={select_ratio} must be in (0, 1]: it is the share of the pool's tokens kept.")
    k = math.ceil(Fraction(str(select_ratio)) * influence.numel())
    order = torch.sort(influence, descending=True, stable=True).indices
    keep = torch.zeros(influence.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def clean_tokens(
    dataset: Dataset,
    base_model: nn.Module,
    reference_model: nn.Module,
    select_ratio: float,
    batch_size: int = 8,
) -> tuple[Dataset, float]:
    """TokenCleaning (fixed models): `dataset` with the labels of all but the global top rho tokens set to -100.

    `dataset`: pretokenized rows with `input_ids` and `labels` (-100 off the responses), e.g. from `pretokenize`.
    `base_model`: the model fine-tuning starts from; `reference_model`: the reference (e.g. the base fine-tuned on
    a small set of good data). Returns (cleaned dataset, share of response tokens kept). Kept tokens keep their
    label; other columns are untouched; rows left with no label stay in the dataset (they add no loss).
    """
    influence, counts = token_influence(dataset, base_model, reference_model, batch_size)
    if influence.numel() == 0:
        raise ValueError(
            "TokenCleaning: the dataset has no response token (every label is -100, or the only labelled token is "
            "the first one). Labels must mark the responses: pretokenize the samples with sstoken_trl.pretokenize."
        )
    keep = global_top_ratio(influence, select_ratio)
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
    fingerprint = hashlib.blake2b(f"{dataset._fingerprint}/token-cleaning/{digest}".encode(), digest_size=8)
    cleaned = dataset.map(clean, with_indices=True, new_fingerprint=fingerprint.hexdigest())
    return cleaned, keep.sum().item() / keep.numel()


def load_reference(path: str, like: PreTrainedModel) -> PreTrainedModel:
    """The reference model from a path or hub id, in `like`'s dtype and on its device, frozen."""
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(like.get_input_embeddings().weight.device).eval().requires_grad_(False)


def check_token_cleaning(config: SSTokenConfig) -> None:
    """Raise unless a token_cleaning run names its reference model (sstoken_history_model)."""
    if not config.history_model:
        raise ValueError(
            "sstoken_selector: token_cleaning scores tokens by L_base - L_ref and needs the reference model: set "
            "sstoken_history_model: PATH (e.g. the base model fine-tuned on a small set of good data)."
        )


def clean_train_split(
    train_set: Dataset, model: PreTrainedModel, config: SSTokenConfig, training: SFTConfig
) -> tuple[Dataset, SSTokenConfig]:
    """sstoken-train with selector token_cleaning: clean the pretokenized train split against the reference model
    (`history_model`), then train plain SFT on it (the returned config's selector is "full")."""
    check_token_cleaning(config)
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "sstoken_selector: token_cleaning runs the base and reference models before training, which DeepSpeed "
            "ZeRO-3 partitions at load. Clean the data first in a single process (sstoken_trl.selection.token_cleaning."
            "clean_tokens), save it, and train on it with sstoken_selector: full."
        )
    placed = getattr(model, "hf_device_map", None) is None and model.device != training.device
    home = model.device
    if placed:  # score on this process's accelerator; the trainer places the model itself afterwards
        model.to(training.device)
    reference = load_reference(config.history_model, like=model)
    batch_size = training.per_device_eval_batch_size
    cleaned, kept = clean_tokens(train_set, model, reference, config.select_ratio, batch_size)
    del reference
    if placed:
        model.to(home)
    if training.process_index == 0:
        print(
            f"TokenCleaning: kept {kept:.1%} of the training set's response tokens (global top "
            f"{config.select_ratio} by L_base - L_ref, reference {config.history_model}); plain SFT on them follows."
        )
    return cleaned, replace(config, selector="full")


__all__ = [
    "check_token_cleaning",
    "clean_tokens",
    "clean_train_split",
    "global_top_ratio",
    "load_reference",
    "token_influence",
]
