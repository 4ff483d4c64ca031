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

import math
from dataclasses import replace
from fractions import Fraction

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTConfig

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.selection.loss_truncation import truncate_tokens
from sstoken_trl.selection.pool import load_reference, relabel, response_log_probs


def token_influence(
    dataset: Dataset, base_model: nn.Module, reference_model: nn.Module, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """influence = L_base - L_ref of every response token of `dataset`, flattened over the pool (float32, CPU).

    Returns (influence, per-row count of response tokens); see `response_log_probs`.
    """
    logp_base, counts, _ = response_log_probs(dataset, base_model, batch_size)
    logp_ref, _, _ = response_log_probs(dataset, reference_model, batch_size)
    return logp_ref - logp_base, counts


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
    keep = global_top_ratio(influence, select_ratio)
    return relabel(dataset, keep, counts, "token-cleaning"), keep.sum().item() / keep.numel()


REFERENCES = {
    "token_cleaning": "scores tokens by L_base - L_ref and needs the reference model: set sstoken_history_model: "
    "PATH (e.g. the base model fine-tuned on a small set of good data).",
    "loss_truncation": "drops the tokens a plain-SFT run on the same data still cannot fit and needs that run: set "
    "sstoken_history_model: PATH (the output_dir of sstoken-train with sstoken_selector: full on this data).",
}


def check_token_cleaning(config: SSTokenConfig) -> None:
    """Raise unless an offline selection (token_cleaning, loss_truncation) names its reference model."""
    if not config.history_model:
        raise ValueError(f"sstoken_selector: {config.selector} {REFERENCES[config.selector]}")


def clean_train_split(
    train_set: Dataset, model: PreTrainedModel, config: SSTokenConfig, training: SFTConfig
) -> tuple[Dataset, SSTokenConfig]:
    """sstoken-train with an offline selector (token_cleaning, loss_truncation): relabel the pretokenized train split
    with the reference model (`history_model`), then train plain SFT on it (the returned config's selector is
    "full")."""
    check_token_cleaning(config)
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            f"sstoken_selector: {config.selector} runs the models before training, which DeepSpeed ZeRO-3 partitions "
            "at load. Clean the data first in a single process (sstoken_trl.selection.token_cleaning.clean_tokens or "
            "sstoken_trl.selection.loss_truncation.truncate_tokens), save it, and train on it with sstoken_selector: "
            "full."
        )
    placed = getattr(model, "hf_device_map", None) is None and model.device != training.device
    home = model.device
    if placed:  # score on this process's accelerator; the trainer places the model itself afterwards
        model.to(training.device)
    reference = load_reference(config.history_model, like=model)
    batch_size = training.per_device_eval_batch_size
    if config.selector == "loss_truncation":
        cleaned, kept = truncate_tokens(train_set, reference, config.select_ratio, config.truncation_loss, batch_size)
        rule = f"dropped L_ref > {config.truncation_loss} log(V), at most {1 - config.select_ratio:.2f} of them"
    else:
        cleaned, kept = clean_tokens(train_set, model, reference, config.select_ratio, batch_size)
        rule = f"global top {config.select_ratio} by L_base - L_ref"
    del reference
    if placed:
        model.to(home)
    if training.process_index == 0:
        name = "Loss truncation" if config.selector == "loss_truncation" else "TokenCleaning"
        print(
            f"{name}: kept {kept:.1%} of the training set's response tokens ({rule}, reference "
            f"{config.history_model}); plain SFT on them follows."
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
