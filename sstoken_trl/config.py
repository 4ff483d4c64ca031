"""Every ssToken knob in one dataclass, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from sstoken_trl.history import HISTORY_SOURCES
from sstoken_trl.scoring.attn_score import BACKENDS
from sstoken_trl.selection.selectors import OFFLINE_SELECTORS, REL_NORMS, SELECTORS
from sstoken_trl.selection.settings import check_read, read_settings

SCOPES = ("sample", "batch")


def _one_of(name: str, value: Any, allowed: Iterable[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


@dataclass
class SSTokenConfig:
    """Settings of ssToken token selection (names follow the paper: rho = select_ratio)."""

    select_ratio: float = field(
        default=0.6,
        metadata={"help": "rho: share of each sample's response tokens trained on, top ceil(rho * n). In (0, 1]."},
    )
    gamma: float = field(
        default=0.5,
        metadata={"help": "Weight of the normalised REL signal; 1 - gamma weighs the attention score. In [0, 1]."},
    )
    attn_layer: int = field(
        default=-1,
        metadata={"help": "Decoder layer whose attention gives AttnScore; negative counts from the end (-1: last)."},
    )
    scope: str = field(
        default="sample",
        metadata={"help": "'sample': top rho within each sample (the paper); 'batch': top rho over the micro-batch."},
    )
    attn_backend: str = field(
        default="sdpa",
        metadata={
            "help": "'sdpa': fused attention with the prompt indicator as value, O(T) memory; "
            "'eager': the paper's materialised softmax(QK^T) recompute."
        },
    )
    rel_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps at the start during which gamma is 0 (history and current model agree)."},
    )
    rel_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of training (of max_steps) at the start during which gamma is 0, like rel_warmup_steps "
            "(the published code: its first 10,000 of 50,000 samples, 0.2). In [0, 1); set one of the two."
        },
    )
    select_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of training (of max_steps) at the start trained on every response token, before "
            "selection starts: at step 0 the history equals the current model, so REL says nothing yet. In [0, 1)."
        },
    )
    rel_norm: str = field(
        default="minmax",
        metadata={
            "help": "Normalisation of REL within a sample: 'minmax' (the paper), 'rank' (percentile rank, so one "
            "outlier cannot squeeze the other tokens together) or 'none' (REL in nats, comparable across samples: "
            "with scope='batch' one threshold over the micro-batch)."
        },
    )
    his_loss_clip: float | None = field(
        default=None,
        metadata={
            "help": "Clip L_his in REL = min(L_his, c * log(vocab size)) - L_cur; 1.0 clips at the loss of a uniform "
            "guess, so tokens the history is confidently wrong about stop dominating the ranking. None: off."
        },
    )
    rel_keep_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Also keep every token whose REL (after his_loss_clip) is at least this, in nats: 0 keeps what "
            "the model predicts at least as well as the history. rho then is the least share kept, and the loss "
            "is normalised by every response token (dropped ones weigh 0). None: off (the paper's top rho)."
        },
    )
    protect_response_end: bool = field(
        default=False,
        metadata={
            "help": "Always train the last token of each response (its end-of-sequence / end-of-turn token), "
            "inside the rho budget, so the model keeps learning to stop. False: the paper's selection."
        },
    )
    history: str = field(
        default="base",
        metadata={
            "help": "Where L_his comes from: 'base' (PEFT adapters disabled), 'model' (a separate frozen model), "
            "'ema' (EMA of the trained weights), 'snapshot' (the trained model as it was when the selection "
            "warm-up ended; needs select_warmup_ratio > 0), 'cache' (per-token base losses stored on disk)."
        },
    )
    history_model: str | None = field(
        default=None,
        metadata={
            "help": "Path or hub id of the history model, for history='model' (with selector='rho1': the reference "
            "model of the excess loss)."
        },
    )
    ema_alpha: float = field(
        default=0.99,
        metadata={
            "help": "alpha of the history EMA (paper Eq. 4), history='ema': theta_his <- alpha * theta_his + "
            "(1 - alpha) * theta. In [0, 1]; 1 keeps the weights training started from."
        },
    )
    ema_update_steps: int = field(
        default=1,
        metadata={"help": "Optimizer steps between two EMA updates of the history weights (history='ema'). >= 1."},
    )
    ema_on_cpu: bool = field(
        default=False,
        metadata={
            "help": "history='ema': keep the EMA weights in CPU memory and copy them in for each history forward "
            "(no accelerator memory; transfer time per micro-batch)."
        },
    )
    history_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the on-disk per-token base-loss cache, for history='cache'. Built on first use; reused "
            "by runs with the same base model, tokenizer and training samples, rejected otherwise."
        },
    )
    selector: str = field(
        default="sstoken",
        metadata={
            "help": "'sstoken' (the method), 'full' (no selection), 'random' (uniform rho), "
            "'rho1' (excess loss L_cur - L_ref; the history source is the reference), 'loss_truncation' (drop "
            "what the history model, a plain-SFT run on the same data, rates below a uniform guess), "
            "'self_truncation' (drop what the model being trained finds far more surprising than its own "
            "uncertainty; no history model), 'token_cleaning' (L_base - L_ref, once before training). "
            "docs/selectors.md."
        },
    )
    truncation_loss: float = field(
        default=1.0,
        metadata={
            "help": "selector='loss_truncation': a token is dropped when the history model (a plain-SFT run on the "
            "same data) has a loss above this multiple of log(vocab size) on it; at least select_ratio is kept."
        },
    )
    surprise_nats: float = field(
        default=3.0,
        metadata={
            "help": "selector='self_truncation': a token is dropped when its loss under the model being trained "
            "exceeds that model's predictive entropy at the position by more than this many nats (L_cur - H_cur); "
            "at least select_ratio is kept. > 0."
        },
    )
    drop_weight: float = field(
        default=0.0,
        metadata={
            "help": "Loss weight of the tokens a selection leaves out: 0 drops them (the paper); above 0 they still "
            "train, slower, so a token wrongly left out (content the model has not learned yet) is never starved. "
            "The loss is then the weighted NLL over every response token. In [0, 1)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' selector."})
    audit_dir: str | None = field(
        default=None,
        metadata={
            "help": "Record, for every micro-batch after the selection warm-up, which tokens of which training "
            "sample the selection left out, into this folder (one file per process; resumes continue it). "
            "`sstoken-audit --record DIR` ranks the samples from it (docs/audit.md)."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.select_ratio <= 1.0:
            raise ValueError(f"select_ratio={self.select_ratio} must be in (0, 1]: it is the share of tokens kept.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1]: it weighs REL against the attention score.")
        if self.rel_warmup_steps < 0:
            raise ValueError(f"rel_warmup_steps={self.rel_warmup_steps} must be >= 0.")
        if not 0.0 <= self.rel_warmup_ratio < 1.0:
            raise ValueError(f"rel_warmup_ratio={self.rel_warmup_ratio} must be in [0, 1): a share of max_steps.")
        if self.rel_warmup_ratio and self.rel_warmup_steps:
            raise ValueError(
                f"rel_warmup_steps={self.rel_warmup_steps} and rel_warmup_ratio={self.rel_warmup_ratio} both set "
                "the REL warm-up; set only one of them."
            )
        if not 0.0 <= self.select_warmup_ratio < 1.0:
            raise ValueError(
                f"select_warmup_ratio={self.select_warmup_ratio} must be in [0, 1): a share of max_steps trained on "
                "every token."
            )
        if self.history == "snapshot" and not self.select_warmup_ratio:
            raise ValueError(
                "history='snapshot' is the model at the end of the selection warm-up; set select_warmup_ratio > 0 "
                "(for example 0.2)."
            )
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha={self.ema_alpha} must be in [0, 1]: it is the weight kept by the history EMA.")
        if self.ema_update_steps < 1:
            raise ValueError(f"ema_update_steps={self.ema_update_steps} must be >= 1 (optimizer steps per EMA update).")
        if self.history == "cache" and not self.history_cache_dir:
            raise ValueError("history='cache' needs history_cache_dir=<folder> for the stored per-token losses.")
        _one_of("scope", self.scope, SCOPES)
        _one_of("attn_backend", self.attn_backend, BACKENDS)
        _one_of("history", self.history, HISTORY_SOURCES)
        _one_of("selector", self.selector, [*SELECTORS, *OFFLINE_SELECTORS])
        if self.rel_keep_threshold is not None:
            self._check_rel_keep_threshold()
        if not 0.0 <= self.drop_weight < 1.0:
            raise ValueError(f"drop_weight={self.drop_weight} must be in [0, 1): the loss weight of a left-out token.")
        if not (math.isfinite(self.surprise_nats) and self.surprise_nats > 0):
            raise ValueError(f"surprise_nats={self.surprise_nats} must be a finite number of nats > 0.")
        if not self.truncation_loss > 0:
            raise ValueError(f"truncation_loss={self.truncation_loss} must be > 0 (a multiple of log(vocab size)).")
        if self.selector == "loss_truncation" and self.history != "model":
            raise ValueError(
                f"selector='loss_truncation' reads the loss of a model trained on the same data, not history="
                f"{self.history!r}: set history='model' and history_model=<the output of a plain-SFT run on this "
                "data> (sstoken-train trains that run itself when history_model is unset)."
            )
        if self.his_loss_clip is not None and not self.his_loss_clip > 0:
            raise ValueError(
                f"his_loss_clip={self.his_loss_clip} must be > 0 (a multiple of log(vocab size)), or None for off."
            )
        _one_of("rel_norm", self.rel_norm, REL_NORMS)
        check_read(self)
        if self.rel_norm == "none" and self.gamma < 1.0 and self.selector == "sstoken":
            raise ValueError(
                f"rel_norm='none' keeps REL in nats, which cannot be mixed with AttnScore (in [0, 1]) at "
                f"gamma={self.gamma}: use gamma=1.0, or rel_norm='rank' (or 'minmax') to mix the two."
            )

    def _check_rel_keep_threshold(self) -> None:
        """rel_keep_threshold counts every response token in the loss's denominator, so it must act wherever the
        budget counts on it: refused where it would be ignored (the loss would shrink by rho, silently)."""
        if not math.isfinite(self.rel_keep_threshold):
            raise ValueError(f"rel_keep_threshold={self.rel_keep_threshold} must be a finite number of nats, or None.")
        if self.selector != "sstoken":
            raise ValueError(
                f"rel_keep_threshold keeps tokens by REL in the 'sstoken' selector only; selector={self.selector!r} "
                "ignores it, and the loss would be divided by every response token. Unset rel_keep_threshold."
            )
        if self.rel_warmup_steps or self.rel_warmup_ratio:
            raise ValueError(
                "rel_keep_threshold is ignored during the REL warm-up (gamma is 0 there, no REL is computed), where "
                "the loss would be divided by every response token; use select_warmup_ratio (every token trained) "
                "instead of rel_warmup_steps / rel_warmup_ratio, or unset rel_keep_threshold."
            )

    @classmethod
    def recommended(cls, **overrides: Any) -> SSTokenConfig:
        """The recommended configuration (docs/selectors.md, measured by benchmarks/real_sft on SmolLM2 and by
        benchmarks/noisy_sft); `overrides` win. Soft loss truncation inside one run against the model being
        trained: no history model, no extra forward, the compute of plain SFT; a suspect token counts half, so
        content the model has not learned yet is slowed, never starved."""
        return cls._preset(RECOMMENDED, overrides)

    @classmethod
    def soft(cls, **overrides: Any) -> SSTokenConfig:
        """Soft ssToken, the paper's signals made safe to run on any data (docs/selectors.md): the paper's Score and
        rho, after a selection warm-up, with every token the model is learning (REL >= 0) kept, the response end
        kept, and the tokens left out still trained at half weight; `overrides` win."""
        return cls._preset(SOFT, overrides)

    @classmethod
    def _preset(cls, preset: dict[str, Any], overrides: dict[str, Any]) -> SSTokenConfig:
        """`preset` with `overrides` winning; preset settings the chosen selector does not read are left out, so
        that switching the selector of a preset (a baseline, one flag away) keeps only what the new one reads."""
        settings = {**preset, **overrides}
        draft = object.__new__(cls)  # the settings as they stand, unvalidated, to ask what the selector reads
        for f in fields(cls):
            setattr(draft, f.name, settings.get(f.name, f.default))
        read = read_settings(draft)
        return cls(**{k: v for k, v in settings.items() if k in overrides or k in read})

    def rel_warmup(self, max_steps: int) -> int:
        """Optimizer steps of the REL warm-up (gamma 0), rel_warmup_ratio resolved against max_steps."""
        return max(self.rel_warmup_steps, math.ceil(self.rel_warmup_ratio * max_steps - 1e-9))

    def select_warmup(self, max_steps: int) -> int:
        """Optimizer steps at the start trained on every response token (select_warmup_ratio of max_steps)."""
        return math.ceil(self.select_warmup_ratio * max_steps - 1e-9)

    def layer_index(self, num_layers: int) -> int:
        """Resolve attn_layer against a model with num_layers decoder layers, or raise."""
        index = self.attn_layer + num_layers if self.attn_layer < 0 else self.attn_layer
        if not 0 <= index < num_layers:
            raise ValueError(
                f"attn_layer={self.attn_layer} is out of range for a model with {num_layers} decoder layers; "
                f"use 0..{num_layers - 1} or -1..-{num_layers}."
            )
        return index

    @classmethod
    def field_help(cls) -> dict[str, tuple[Any, str]]:
        """Field name -> (default, help text), for docs and command-line parsers."""
        return {f.name: (f.default, f.metadata.get("help", "")) for f in fields(cls)}


# What SSTokenConfig.recommended() changes from the paper-exact default (docs/selectors.md says why): after half
# of the steps on every token, what the model being trained finds e^3 times less likely than it expects
# (L_cur - H_cur > 3 nats) counts half in the loss, at most a fifth of the micro-batch, never a response's end.
RECOMMENDED: dict[str, Any] = {
    "selector": "self_truncation",  # surprise_nats 3.0 is the default
    "select_warmup_ratio": 0.5,
    "select_ratio": 0.8,
    "scope": "batch",
    "protect_response_end": True,
    "drop_weight": 0.5,
}

# Soft ssToken, SSTokenConfig.soft(): the paper's REL, AttnScore and rho, with what is being learned never left out.
SOFT: dict[str, Any] = {
    "gamma": 0.5,
    "select_warmup_ratio": 0.5,
    "rel_keep_threshold": 0.0,
    "protect_response_end": True,
    "drop_weight": 0.5,
}
