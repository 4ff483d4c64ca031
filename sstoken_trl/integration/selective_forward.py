"""The selective forward: history log-probs, the training forward with AttnScore, selection, masked outputs.

It replaces the `forward` of the model that carries TRL's fused LM head. TRL's compute_loss then sums
`-log_probs` (zero off the kept tokens) and divides by `num_items_in_batch`, which `SelectionBudget` made
the kept-token count: the loss is the mean NLL over the selected tokens. Rows of a selection warm-up step (marked
where the step is exact, budget.py) keep every response token; before the warm-up ends no history or attention
forward and no selector runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.history import HistorySource
from sstoken_trl.scoring.hook import AttnScoreHook
from sstoken_trl.scoring.layout import Layout, batch_layout
from sstoken_trl.selection.budget import REAL_LABELS, take_warm_rows
from sstoken_trl.selection.equations import rel
from sstoken_trl.selection.selectors import (
    Selection,
    Signals,
    Stats,
    get_selector,
    micro_batch_seed,
    ranked_rel,
    soften,
)


@dataclass
class BatchSelection:
    """One micro-batch's selection, on target positions (B, T-1) except input_ids, labels, real, doc (B, T)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    real: torch.Tensor  # not padding
    doc: torch.Tensor  # document index within the row (packed rows hold several samples)
    response: torch.Tensor
    rel: torch.Tensor  # the REL selection ranked by (L_his clipped with his_loss_clip)
    attn_score: torch.Tensor
    score: torch.Tensor
    keep: torch.Tensor
    keep_rel: torch.Tensor  # what REL alone would keep: keep & ~keep_rel were kept thanks to the attention score
    loss: torch.Tensor | None = None  # L_cur, the current model's loss on each target
    weight: torch.Tensor | None = None  # each kept token's loss weight, where the selection weighs tokens


def uses_attention(config: SSTokenConfig, max_steps: int) -> bool:
    """Whether the selector reads AttnScore at some step: at config.gamma, or at gamma 0 during the REL warm-up."""
    needs = get_selector(config.selector).needs_attention
    return needs(config, config.gamma) or (config.rel_warmup(max_steps) > 0 and needs(config, 0.0))


class SelectiveForward:
    """Drop-in `forward` for the model that carries TRL's fused LM head."""

    def __init__(
        self,
        forward: Callable[..., Any],
        config: SSTokenConfig,
        hook: AttnScoreHook | None,
        history: HistorySource | None,
        max_steps: int = 0,
        vocab_size: int = 0,
    ) -> None:
        self.forward = forward
        self.config = config
        self.hook = hook
        self.history = history
        self.global_step = 0
        self.rel_warmup = config.rel_warmup(max_steps)
        self.select_warmup = config.select_warmup(max_steps)
        self.vocab_size = vocab_size
        self.calls = 0
        self.stats: Stats = {}
        self.last: BatchSelection | None = None

    def gamma(self) -> float:
        return 0.0 if self.global_step < self.rel_warmup else self.config.gamma

    def __call__(self, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        real_labels = kwargs.pop(REAL_LABELS, None)
        if real_labels is None:
            return self.forward(*args, fused_lm_head=fused_lm_head, **kwargs)
        if not fused_lm_head:
            raise RuntimeError(
                "The trainer called the model on a training batch without TRL's fused LM head, so it computes "
                "its loss in a way ssToken does not know (compute_loss_func, label smoothing, or a custom "
                "compute_loss). ssToken refuses to train plain SFT silently; use the default SFT loss."
            )
        kwargs["labels"] = real_labels
        warm_rows = take_warm_rows(kwargs, self.global_step, self.select_warmup)
        layout = batch_layout(real_labels, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        selected, warm = layout.without_rows(warm_rows)  # warm-up rows keep every response token
        gamma = self.gamma()
        selector = get_selector(self.config.selector)
        selecting = self.global_step >= self.select_warmup  # before: every row is a warm-up row
        needs_history = self.history is not None and selector.needs_history(self.config, gamma) and selecting
        logp_his = self.history.log_probs(self.forward, kwargs) if needs_history else None
        if self.history is not None:
            self.history.strip_batch(kwargs)  # fields the history source added; the model must not see them
        attending = selector.needs_attention(self.config, gamma) and selecting
        if attending:
            self.hook.arm(layout)
        out = self.forward(*args, fused_lm_head=True, **kwargs)
        logp_cur = out.log_probs.detach()
        attn = self.hook.take()[:, 1:] if attending else torch.zeros_like(logp_cur)
        rel_values = rel(logp_cur, logp_his) if logp_his is not None else torch.zeros_like(logp_cur)
        seed = micro_batch_seed(self.config.seed, self.global_step, self.calls)
        entropy = out.entropy.detach() if out.entropy is not None else None
        signals = Signals(selected, rel_values, attn, gamma, seed, logp_cur, self.vocab_size, entropy)
        if selecting:
            selection = selector.select(self.config, signals)
            if self.config.drop_weight > 0:
                selection = soften(selection, layout.response, logp_cur, self.config.drop_weight)
        else:  # the selection warm-up: every response token, nothing read
            selection = Selection(torch.zeros_like(logp_cur), layout.response)
        keep, keep_rel = selection.keep | warm, selection.keep_rel | warm
        weight = None if selection.weight is None else torch.where(warm, 1.0, selection.weight)
        stats = {"selected_fraction": (keep.sum(), layout.response.sum()), **selection.stats}
        self._record(kwargs, layout, ranked_rel(self.config, signals), attn, selection.score, keep, keep_rel, stats)
        self.last.loss, self.last.weight = -logp_cur, weight
        return self._masked(out, keep, weight)

    @staticmethod
    def _masked(out: Any, keep: torch.Tensor, weight: torch.Tensor | None = None) -> Any:
        """The fused output restricted to kept tokens, each log-prob scaled by its loss weight when the selector
        weighs tokens: TRL's loss and metrics then cover those alone."""
        zero = torch.zeros((), dtype=out.log_probs.dtype, device=keep.device)
        weighted = out.log_probs if weight is None else out.log_probs * weight.to(out.log_probs.dtype)
        log_probs = torch.where(keep, weighted, zero)
        fields = {"log_probs": log_probs, "label_mask": keep}
        for name in ("entropy", "is_top1", "log_sum_sq_probs", "mean_logits"):
            value = getattr(out, name)
            if value is not None:
                fields[name] = torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=keep.device))
        fields["loss"] = -log_probs.sum() / keep.sum().clamp(min=1)
        return replace(out, **fields)

    def _record(
        self,
        inputs: dict[str, Any],
        layout: Layout,
        rel_values: torch.Tensor,
        attn: torch.Tensor,
        score: torch.Tensor,
        keep: torch.Tensor,
        keep_rel: torch.Tensor,
        stats: Stats,
    ) -> None:
        for name, (value, count) in stats.items():
            total, total_count = self.stats.get(name, (0.0, None if count is None else 0.0))
            self.stats[name] = (value.float() + total, None if count is None else count.float() + total_count)
        self.calls += 1
        self.last = BatchSelection(
            input_ids=inputs["input_ids"].detach(),
            labels=inputs["labels"].detach(),
            real=layout.real,
            doc=layout.doc,
            response=layout.response,
            rel=rel_values,
            attn_score=attn,
            score=score,
            keep=keep,
            keep_rel=keep_rel,
        )

    def take_stats(self) -> tuple[int, Stats]:
        """(micro-batches seen, summed statistics: name -> (sum, count, or None for a count)) since the last call,
        and reset them."""
        calls, stats = self.calls, self.stats
        self.calls, self.stats = 0, {}
        return calls, stats
