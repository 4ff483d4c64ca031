"""SSTokenCallback: wires ssToken selection onto an unmodified TRL SFTTrainer.

At train start it checks the trainer's loss path, hooks the scoring layer, replaces the forward of the model
that carries TRL's fused LM head with the selective forward, and wraps the train collator so that the
trainer's token count is the kept-token count; with a selection warm-up, the trainer's count of each optimizer
step's micro-batches is where the step is known exactly, so the warm-up is decided there. Each optimizer step it
checks that selection ran and adds its statistics to TRL's metrics (so they reach every logger). Checkpoints get
the history state and the base of the warm-up ratios. At train end everything is undone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from sstoken_trl.audit.run_record import AuditRecorder
from sstoken_trl.config import SSTokenConfig
from sstoken_trl.history import HistoryContext, HistorySource, build_history
from sstoken_trl.integration.guards import check_runtime, shards_parameters
from sstoken_trl.integration.selective_forward import BatchSelection, SelectiveForward, uses_attention
from sstoken_trl.integration.warmup import save_warmup_base, uses_base, warmup_base
from sstoken_trl.notices import four_bit_notice
from sstoken_trl.scoring.hook import hook_scoring_layer
from sstoken_trl.selection.budget import SelectionBudget
from sstoken_trl.selection.selectors import OFFLINE_SELECTORS, budget_ratio, uses_history
from sstoken_trl.trl_internals import (
    append_metric,
    before_token_count,
    check_fused_head,
    check_loss_path,
    checkpoint_folder,
    collate_owner,
    find_trainer,
    fused_model,
    set_metric,
)


class SSTokenCallback(TrainerCallback):
    """Train on the tokens ssToken selects. Add to `SFTTrainer(callbacks=[...])`, or build it after the
    trainer with `SSTokenCallback(config, trainer=trainer)` and `trainer.add_callback(...)`.

    `history_model` (instance or path) is the history for `history="model"`. After training, or between
    steps, `last_selection` holds the last micro-batch's selection for inspection.
    """

    def __init__(
        self,
        config: SSTokenConfig | None = None,
        history_model: nn.Module | str | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self.config = config or SSTokenConfig()
        if self.config.selector in OFFLINE_SELECTORS:
            raise ValueError(
                "selector='token_cleaning' cleans the labels once before training, not per batch: call "
                "sstoken_trl.selection.token_cleaning.clean_tokens(dataset, base_model, reference_model, "
                "select_ratio), then train with SSTokenConfig(selector='full') (sstoken-train "
                "--sstoken_selector token_cleaning does both)."
            )
        self.history_model = history_model if history_model is not None else self.config.history_model
        if self.config.history == "model" and self.history_model is None and uses_history(self.config):
            hint = ""
            if self.config.selector == "loss_truncation":
                hint = " (run 1: a plain-SFT run on the same data, e.g. sstoken-train with --sstoken_selector full)"
            raise ValueError(f"history='model' needs a history model: pass history_model=<path or model>{hint}.")
        self.trainer: Trainer | None = None
        self.selective_forward: SelectiveForward | None = None
        self._undo: list[Callable[[], None]] = []
        self._collate_fn = None
        self._warmup_base = 0  # the max_steps warm-up ratios are shares of (kept across resumes)
        self.recorder = AuditRecorder(self, self.config.audit_dir) if self.config.audit_dir else None
        if trainer is not None:
            self._attach(trainer)

    @property
    def last_selection(self) -> BatchSelection | None:
        return self.selective_forward.last if self.selective_forward else None

    @property
    def history(self) -> HistorySource | None:
        return self.selective_forward.history if self.selective_forward else None

    def _attach(self, trainer: Trainer) -> None:
        check_loss_path(trainer)
        check_runtime(trainer, self.config)
        self.trainer = trainer

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            self._attach(find_trainer())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # transformers re-enters its training loop without on_train_end (auto_find_batch_size after an
        # out-of-memory error): undo the previous start first, so nothing is wrapped or hooked twice.
        self._restore()
        if self.trainer is None:
            self._attach(find_trainer())
        trainer = self.trainer
        check_fused_head(trainer)
        inner = fused_model(trainer.model)
        four_bit_notice(inner)  # what bitsandbytes' import said now concerns this run: said once
        base = self._warmup_base = warmup_base(self.config, state.max_steps, state.global_step)
        owner = collate_owner(kwargs["train_dataloader"])
        collate_fn = self._collate_fn = owner.collate_fn
        warmup = self.config.select_warmup(base)
        budget = SelectionBudget(collate_fn, budget_ratio(self.config), self.config.scope, warmup)
        if warmup:  # collated batches count the selection; a warm-up step's count is set when its step is known
            self._undo.append(before_token_count(trainer, budget.mark_step))
        hook = None  # selectors and phases that read no attention never look at the architecture
        if uses_attention(self.config, base):
            hook = hook_scoring_layer(inner, self.config, probe=not shards_parameters(trainer))
            self._undo.append(hook.remove)
        fused_forward = inner.forward
        history = self._history(trainer, inner, fused_forward, state.global_step, base)
        vocab_size = inner.config.get_text_config().vocab_size
        self.selective_forward = SelectiveForward(fused_forward, self.config, hook, history, base, vocab_size)
        inner.forward = self.selective_forward
        self._undo.append(lambda: vars(inner).__setitem__("forward", fused_forward))
        owner.collate_fn = history.wrap_collate(budget) if history is not None else budget
        self._undo.append(lambda: setattr(owner, "collate_fn", collate_fn))
        if self.recorder is not None:
            self.recorder.start(state.global_step)

    def _history(
        self, trainer: Trainer, inner: nn.Module, forward: Any, global_step: int, max_steps: int
    ) -> HistorySource | None:
        """The configured history source; None when the selector never uses one. Resumed runs restore its state."""
        if not uses_history(self.config):
            return None
        context = HistoryContext(
            self.config, trainer.model, inner, forward, self.history_model, trainer, global_step, max_steps
        )
        return build_history(context)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.selective_forward.global_step = state.global_step

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.read()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.read()
        calls, stats = self.selective_forward.take_stats()
        if calls == 0:
            raise RuntimeError(
                "No training batch went through ssToken selection in this optimizer step: the train data loader "
                "or the model forward was replaced after training started."
            )
        trainer = self.trainer
        for name, value in reduce_stats(trainer, stats).items():
            append_metric(trainer, f"sstoken/{name}", value)
        # Running totals of a collator that counts bad or truncated samples (SSTokenCollator.counts).
        for key, total in getattr(self._collate_fn, "counts", {}).items():
            set_metric(trainer, f"sstoken/{key}", total)
        if self.history is not None:
            self.history.after_optimizer_step(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Store the history state (EMA weights, cache fingerprint) and the base of the warm-up ratios in the
        checkpoint just written."""
        if not args.should_save:
            return
        if self.history is not None:
            self.history.save(checkpoint_folder(args, state))
        if uses_base(self.config):
            save_warmup_base(checkpoint_folder(args, state), self._warmup_base)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        """Undo what on_train_begin did, last change first."""
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def reduce_stats(trainer: Trainer, stats: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """Each statistic summed over the step's micro-batches and every process: a mean (sum over count, left out where
    the count is 0, e.g. the surprise of dropped tokens when none was dropped) or a count."""
    names = sorted(stats)  # the same names on every process: one selector, one step
    sums = torch.stack([stats[n][0] for n in names] + [stats[n][1] for n in names if stats[n][1] is not None])
    sums = trainer.accelerator.reduce(sums.float(), reduction="sum").tolist()
    values, counts = sums[: len(names)], iter(sums[len(names) :])
    out = {}
    for name, value in zip(names, values, strict=True):
        if stats[name][1] is None:
            out[name] = value
        elif (count := next(counts)) > 0:
            out[name] = value / count
    return out


__all__ = ["SSTokenCallback"]
