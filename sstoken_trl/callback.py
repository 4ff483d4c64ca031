"""SSTokenCallback: wires ssToken selection onto an unmodified TRL SFTTrainer.

At train start it checks the trainer's loss path, hooks the scoring layer, replaces the forward of the model
that carries TRL's fused LM head with the selective forward, and wraps the train collator so that the
trainer's token count is the kept-token count. Each optimizer step it checks that selection ran and adds
its statistics to TRL's metrics (so they reach every logger). At train end everything is undone.
"""

from __future__ import annotations

import inspect
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from trl import SFTTrainer

from sstoken_trl.budget import SelectionBudget
from sstoken_trl.cache import CacheHistory, open_cache
from sstoken_trl.checkpoint import checkpoint_folder, resume_checkpoint
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.ema import EMAHistory
from sstoken_trl.history import BaseHistory, Forward, HistorySource, ModelHistory
from sstoken_trl.hook import hook_scoring_layer
from sstoken_trl.selectors import budget_ratio, uses_history
from sstoken_trl.step import STAT_NAMES, Selection, SelectiveForward


def find_trainer() -> Trainer:
    """The Trainer whose callback event is running: callbacks are not handed the trainer itself."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError("SSTokenCallback must be used as a callback of a TRL SFTTrainer.")


def check_loss_path(trainer: Trainer) -> None:
    """Raise unless the trainer computes TRL's default NLL through the fused LM head."""
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"SSTokenCallback needs a trl.SFTTrainer (or a subclass), got {type(trainer).__name__}.")
    args = trainer.args
    problems = []
    if args.loss_type != "nll":
        problems.append(f"loss_type={args.loss_type!r} (use 'nll')")
    if trainer.compute_loss_func is not None:
        problems.append("a compute_loss_func")
    if args.label_smoothing_factor:
        problems.append(f"label_smoothing_factor={args.label_smoothing_factor}")
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and getattr(parallelism, "sp_enabled", False):
        problems.append("sequence parallelism")
    if problems:
        raise ValueError(
            "ssToken selects tokens inside TRL's default SFT loss (mean NLL through the fused LM head); "
            f"this trainer is set up with {', '.join(problems)}, a loss path ssToken does not support."
        )


def check_fused_head(trainer: Trainer) -> None:
    """Raise unless TRL's fused LM head (installed after Trainer.__init__) and its metrics store are there."""
    if not isinstance(getattr(trainer, "_metrics", None), dict):
        raise RuntimeError(
            "This TRL SFTTrainer keeps no `_metrics` store, where ssToken puts its statistics for the loggers: "
            "this version of sstoken-trl supports trl 1.16."
        )
    if "forward" not in vars(fused_model(trainer.model)):
        raise RuntimeError(
            "TRL's fused LM head is not installed on the model: the installed TRL computes the SFT loss in a "
            "way this version of sstoken-trl does not know. Use trl 1.16."
        )


def fused_model(model: nn.Module) -> PreTrainedModel:
    """The model that carries TRL's fused LM head: the base model under PEFT, else the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class SSTokenCallback(TrainerCallback):
    """Train on the tokens ssToken selects. Add to `SFTTrainer(callbacks=[...])`.

    `history_model` (instance or path) is the history for `history="model"`. After training, or between
    steps, `last_selection` holds the last micro-batch's selection for inspection.
    """

    def __init__(self, config: SSTokenConfig | None = None, history_model: nn.Module | str | None = None) -> None:
        self.config = config or SSTokenConfig()
        self.history_model = history_model if history_model is not None else self.config.history_model
        if self.config.history == "model" and self.history_model is None:
            raise ValueError("history='model' needs a history model: pass history_model=<path or model>.")
        self.trainer: Trainer | None = None
        self.step: SelectiveForward | None = None
        self._undo: list = []
        self._collate_fn = None

    @property
    def last_selection(self) -> Selection | None:
        return self.step.last if self.step else None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer = find_trainer()
        check_loss_path(self.trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any) -> None:
        trainer = self.trainer or find_trainer()
        self.trainer = trainer
        check_loss_path(trainer)
        check_fused_head(trainer)
        inner = fused_model(trainer.model)
        hook = hook_scoring_layer(inner, self.config)
        fused_forward = inner.forward
        history = self._history(trainer, inner, fused_forward, state.global_step)
        vocab_size = inner.config.get_text_config().vocab_size
        self.step = SelectiveForward(fused_forward, self.config, hook, history, state.max_steps, vocab_size)
        inner.forward = self.step
        # accelerate's loaders delegate to the DataLoader they wrap: the collate function lives there.
        dataloader = kwargs["train_dataloader"]
        dataloader = getattr(dataloader, "base_dataloader", dataloader)
        collate_fn = self._collate_fn = dataloader.collate_fn
        budget = SelectionBudget(collate_fn, budget_ratio(self.config), self.config.scope)
        dataloader.collate_fn = history.wrap_collate(budget) if isinstance(history, CacheHistory) else budget
        self._undo = [hook.remove, lambda: vars(inner).__setitem__("forward", fused_forward)]
        self._undo.append(lambda: setattr(dataloader, "collate_fn", collate_fn))

    def _history(
        self, trainer: Trainer, inner: PreTrainedModel, forward: Forward, global_step: int
    ) -> HistorySource | None:
        """The configured history source; None when the selector never uses one. Resumed runs restore its state."""
        kind = self.config.history
        if not uses_history(self.config):
            return None
        if kind == "base":
            return BaseHistory(trainer.model)
        if kind == "model":
            return ModelHistory(self.history_model, like=inner)
        resume = resume_checkpoint() if global_step > 0 else None
        if kind == "cache":
            return open_cache(self.config.history_cache_dir, trainer, forward, resume)
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise ValueError("history='ema' swaps whole parameters in and out; FSDP and DeepSpeed shard them.")
        ema = EMAHistory(trainer.model, self.config.ema_alpha, self.config.ema_update_steps, self.config.ema_on_cpu)
        if resume is not None:
            ema.load(resume)
        return ema

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step.global_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        calls, stats = self.step.take_stats()
        if calls == 0:
            raise RuntimeError(
                "No training batch went through ssToken selection in this optimizer step: the train data loader "
                "or the model forward was replaced after training started."
            )
        stats = self.trainer.accelerator.reduce(stats, reduction="sum").tolist()
        values = dict(zip(STAT_NAMES, stats, strict=True))
        n, kept = max(values["response_tokens"], 1.0), max(values["kept_tokens"], 1.0)
        metrics = self.trainer._metrics["train"]
        metrics["sstoken/selected_fraction"].append(values["kept_tokens"] / n)
        metrics["sstoken/rel_mean"].append(values["rel_sum"] / n)
        metrics["sstoken/attn_score_mean"].append(values["attn_score_sum"] / n)
        metrics["sstoken/kept_by_attention_fraction"].append(values["kept_by_attention"] / kept)
        metrics["sstoken/nonfinite_rel_tokens"].append(values["nonfinite_rel"])
        # Running totals of a collator that counts bad or truncated samples (SSTokenCollator.counts).
        for key, total in getattr(self._collate_fn, "counts", {}).items():
            metrics[f"sstoken/{key}"] = [total]
        if isinstance(self.step.history, EMAHistory):
            self.step.history.update(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Store the history state (EMA weights, cache fingerprint) in the checkpoint just written."""
        history = self.step.history if self.step else None
        if args.should_save and isinstance(history, EMAHistory | CacheHistory):
            history.save(checkpoint_folder(args, state))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


__all__ = ["SSTokenCallback", "check_loss_path", "find_trainer"]
