"""Token selectors: ssToken and the baselines the paper compares against, by name (docs/selectors.md).

A selector turns one micro-batch's signals into (score, keep, keep_by_rel) on target positions (B, T-1), all
vectorised over the batch: no Python loop over samples, no host sync. `keep_by_rel` is what the REL term alone
would keep (it feeds the kept-by-attention statistic); selectors without an attention term return `keep`.
Each selector also says which signals it needs, so the selective forward skips the history forward or the
attention score when they are unused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sstoken_trl.scoring.layout import Layout
from sstoken_trl.selection.equations import (
    clipped_rel,
    combine,
    minmax_normalise,
    no_normalise,
    rank_normalise,
    response_ends,
    top_ratio,
)

if TYPE_CHECKING:
    from sstoken_trl.config import SSTokenConfig

SelectorOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (score, keep, keep_by_rel)


@dataclass
class Signals:
    """What a selector may use for one micro-batch; a signal that was not computed is all zeros."""

    layout: Layout
    rel: torch.Tensor  # REL = log p_cur - log p_his = L_his - L_cur, (B, T-1)
    attn: torch.Tensor  # AttnScore on target positions, (B, T-1)
    gamma: float  # weight of REL at this step (0 during the REL warm-up)
    seed: int  # seed of this micro-batch: the random draw, and tie-breaks
    logp_cur: torch.Tensor | None = None  # log p_cur on target positions, for his_loss_clip
    vocab_size: int = 0  # of the model, for his_loss_clip
    entropy: torch.Tensor | None = None  # H_cur, the current model's predictive entropy per target position


# How REL is normalised within a sample ("none": raw nats, for one threshold over the batch with gamma 1).
REL_NORMS = {"minmax": minmax_normalise, "rank": rank_normalise, "none": no_normalise}


def sstoken_select(
    config: SSTokenConfig,
    layout: Layout,
    rel_values: torch.Tensor,
    attn: torch.Tensor,
    gamma: float,
    seed: int = 0,
) -> SelectorOutput:
    """ssToken (Eq. 3-11): Score = gamma * norm(REL) + (1 - gamma) * AttnScore, top rho, ties broken by `seed`.

    Non-finite REL is never kept but counts in n; with `protect_response_end` each response's last token is kept
    first, inside the same ceil(rho * n).
    """
    response = layout.response
    finite = response & rel_values.isfinite()
    samples, num_samples = layout.sample_ids(), layout.sample_id_bound
    normalise = REL_NORMS[config.rel_norm]
    rel_norm = normalise(torch.nan_to_num(rel_values), samples, finite, num_samples)
    score = combine(rel_norm, attn, gamma)
    segment, num_segments = layout.segments(config.scope)
    ranked, ranked_rel = score, rel_norm
    if config.protect_response_end:
        ends = response_ends(response, samples)
        ranked, ranked_rel = score.masked_fill(ends, torch.inf), rel_norm.masked_fill(ends, torch.inf)
        finite = finite | ends
    keep = top_ratio(ranked, segment, finite, num_segments, config.select_ratio, response, seed)
    keep_rel = top_ratio(ranked_rel, segment, finite, num_segments, config.select_ratio, response, seed)
    if config.rel_keep_threshold is not None and gamma > 0:
        above = finite & (torch.nan_to_num(rel_values, nan=-torch.inf) >= config.rel_keep_threshold)
        keep, keep_rel = keep | above, keep_rel | above
    return score, keep, keep_rel


def ranked_rel(config: SSTokenConfig, s: Signals) -> torch.Tensor:
    """The REL ssToken ranks by: L_his - L_cur, with L_his clipped when `his_loss_clip` is set."""
    if config.selector != "sstoken" or config.his_loss_clip is None:
        return s.rel
    if s.logp_cur is None or s.vocab_size < 2:
        raise ValueError("his_loss_clip needs the current log-probs and the model's vocabulary size.")
    return clipped_rel(s.rel, s.logp_cur, config.his_loss_clip * math.log(s.vocab_size))


def sstoken(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    return sstoken_select(config, s.layout, ranked_rel(config, s), s.attn, s.gamma, s.seed)


def full(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    """Full-data SFT: every response token is kept."""
    response = s.layout.response
    return response.float(), response, response


def uniform_random(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    """Random: a uniform draw ranks each sample's response tokens; top ceil(rho * n) kept. Seeded per micro-batch."""
    response = s.layout.response
    generator = torch.Generator(device=response.device).manual_seed(s.seed)
    score = torch.rand(response.shape, generator=generator, device=response.device)
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(score, segment, response, num_segments, config.select_ratio)
    return torch.where(response, score, 0.0), keep, keep  # continuous draws: no ties to break


def rho1(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    """RHO-1: excess loss L_cur - L_ref = -(log p_cur - log p_ref) = -REL against the reference (history) model."""
    excess = -s.rel
    finite = s.layout.response & excess.isfinite()
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(
        torch.nan_to_num(excess), segment, finite, num_segments, config.select_ratio, s.layout.response, s.seed
    )
    return torch.where(finite, excess, 0.0), keep, keep


def truncate(config: SSTokenConfig, s: Signals, suspicion: torch.Tensor, threshold: float) -> SelectorOutput:
    """Drop the response tokens whose `suspicion` exceeds `threshold`, most suspect first, while at least
    ceil(rho * n) tokens of the segment stay kept; with protect_response_end a response's last token never is.
    The score is the suspicion."""
    response = s.layout.response
    suspect = response & (suspicion > threshold)
    if config.protect_response_end:
        suspect &= ~response_ends(response, s.layout.sample_ids())
    safety = torch.where(suspect, -suspicion, torch.inf)  # kept first: every non-suspect, then the least suspect
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(safety, segment, response, num_segments, config.select_ratio, response, s.seed)
    keep = keep | (response & ~suspect)
    return torch.where(response, suspicion, 0.0), keep, keep


def loss_truncation(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    """Loss truncation against a self-reference (the history model: a plain-SFT run on the same data).

    A token is suspect when L_ref > c * log(V) (c = truncation_loss): after a whole run of training on it the
    reference still rates it below a uniform guess. The score is L_ref.
    """
    if s.logp_cur is None or s.vocab_size < 2:
        raise ValueError("loss_truncation needs the current log-probs and the model's vocabulary size.")
    ref_loss = torch.nan_to_num(s.rel - s.logp_cur, nan=torch.inf)  # REL - log p_cur = -log p_ref = L_ref
    return truncate(config, s, ref_loss, config.truncation_loss * math.log(s.vocab_size))


def self_truncation(config: SSTokenConfig, s: Signals) -> SelectorOutput:
    """Loss truncation inside one run, against the model being trained: no history model, no extra forward.

    A token is suspect when its loss exceeds the model's own predictive entropy there by more than c nats
    (L_cur - H_cur > c, c = surprise_nats): the model expects to pay H_cur at that position, and a token it
    finds e^c times less likely than it expects contradicts what it has learned from the rest of the data. The
    score is that surprise, L_cur - H_cur. Start it after a selection warm-up (select_warmup_ratio), once the
    model has learned what the data agrees on.
    """
    if s.logp_cur is None or s.entropy is None:
        raise ValueError("self_truncation needs the current log-probs and entropy (TRL's fused LM head outputs).")
    surprise = torch.nan_to_num(-s.logp_cur - s.entropy, nan=torch.inf)
    return truncate(config, s, surprise, config.surprise_nats)


def _never(gamma: float) -> bool:
    return False


def _always(gamma: float) -> bool:
    return True


@dataclass(frozen=True)
class Selector:
    select: Callable[[SSTokenConfig, Signals], SelectorOutput]
    needs_history: Callable[[float], bool]  # given this step's gamma
    needs_attention: Callable[[float], bool]
    keeps_all: bool = False
    counts_all: bool = False  # the kept number is known only after the forward: the budget counts every token


SELECTORS: dict[str, Selector] = {
    "sstoken": Selector(sstoken, needs_history=lambda gamma: gamma > 0, needs_attention=lambda gamma: gamma < 1),
    "full": Selector(full, needs_history=_never, needs_attention=_never, keeps_all=True),
    "random": Selector(uniform_random, needs_history=_never, needs_attention=_never),
    "rho1": Selector(rho1, needs_history=_always, needs_attention=_never),
    "loss_truncation": Selector(loss_truncation, needs_history=_always, needs_attention=_never, counts_all=True),
    "self_truncation": Selector(self_truncation, needs_history=_never, needs_attention=_never, counts_all=True),
}


OFFLINE_SELECTORS = ("token_cleaning",)  # select once before training (token_cleaning.py), then train "full"


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"Unknown selector {name!r}; choose one of {', '.join(map(repr, SELECTORS))}.")
    return SELECTORS[name]


def uses_history(config: SSTokenConfig) -> bool:
    """Whether training will ever need history log-probs (the REL warm-up only lowers gamma to 0)."""
    return get_selector(config.selector).needs_history(config.gamma)


def budget_ratio(config: SSTokenConfig) -> float:
    """Share of response tokens the trainer's token count must cover: 1 for "full" and when tokens above
    rel_keep_threshold are kept too (their number is known only after the forward), else rho."""
    selector = get_selector(config.selector)
    if selector.keeps_all or selector.counts_all or config.rel_keep_threshold is not None:
        return 1.0
    return config.select_ratio


def micro_batch_seed(seed: int, global_step: int, micro_batch: int) -> int:
    """A seed fixed by (seed, optimizer step, micro-batch in the step, process rank): reproducible, also on resume."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    digest = hashlib.blake2b(f"{seed}/{global_step}/{micro_batch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
