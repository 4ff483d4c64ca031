"""Token selectors: ssToken and the baselines the paper compares against, by name (docs/selectors.md).

A selector turns one micro-batch's signals into a `Selection` on target positions (B, T-1): (score, keep,
keep_by_rel), all vectorised over the batch (no Python loop over samples, no host sync), with an optional per-token
loss weight and the statistics of the signals it read. `keep_by_rel` is what the REL term alone would keep (it
feeds the kept-by-attention statistic); selectors without an attention term return `keep`. Each selector also says
which signals it needs, so the selective forward skips the history forward or the attention score when they are
unused.
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

Stats = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # name -> (numerator, denominator); None: a count


class Selection(tuple):
    """(score, keep, keep_rel) of one micro-batch, carrying the per-token loss `weight` (None: every kept token
    weighs 1) and the `stats` of the signals the selector read, summed over the micro-batch."""

    def __new__(
        cls,
        score: torch.Tensor,
        keep: torch.Tensor,
        keep_rel: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        stats: Stats | None = None,
    ) -> Selection:
        selection = super().__new__(cls, (score, keep, keep if keep_rel is None else keep_rel))
        selection.weight, selection.stats = weight, stats or {}
        return selection

    @property
    def score(self) -> torch.Tensor:
        return self[0]

    @property
    def keep(self) -> torch.Tensor:
        return self[1]

    @property
    def keep_rel(self) -> torch.Tensor:
        return self[2]


def mean_over(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of `values` where `mask`: a statistic averaged over micro-batches and processes."""
    return torch.where(mask, values, 0.0).sum(), mask.sum()


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
) -> Selection:
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
    return Selection(score, keep, keep_rel)


def ranked_rel(config: SSTokenConfig, s: Signals) -> torch.Tensor:
    """The REL ssToken ranks by: L_his - L_cur, with L_his clipped when `his_loss_clip` is set."""
    if config.selector != "sstoken" or config.his_loss_clip is None:
        return s.rel
    if s.logp_cur is None or s.vocab_size < 2:
        raise ValueError("his_loss_clip needs the current log-probs and the model's vocabulary size.")
    return clipped_rel(s.rel, s.logp_cur, config.his_loss_clip * math.log(s.vocab_size))


def rel_stats(rel_values: torch.Tensor, response: torch.Tensor) -> Stats:
    """Mean REL over the response tokens where it is finite, and the number where it is not."""
    finite = response & rel_values.isfinite()
    return {"rel_mean": mean_over(rel_values, finite), "nonfinite_rel_tokens": ((response & ~finite).sum(), None)}


def sstoken(config: SSTokenConfig, s: Signals) -> Selection:
    rel_values = ranked_rel(config, s)
    score, keep, keep_rel = sstoken_select(config, s.layout, rel_values, s.attn, s.gamma, s.seed)
    response, stats = s.layout.response, {}
    if s.gamma > 0:
        stats.update(rel_stats(rel_values, response))
    if s.gamma < 1:
        stats["attn_score_mean"] = mean_over(s.attn, response)
    if 0 < s.gamma < 1:
        stats["kept_by_attention_fraction"] = ((keep & ~keep_rel).sum(), keep.sum())
    return Selection(score, keep, keep_rel, stats=stats)


def full(config: SSTokenConfig, s: Signals) -> Selection:
    """Full-data SFT: every response token is kept."""
    response = s.layout.response
    return Selection(response.float(), response)


def uniform_random(config: SSTokenConfig, s: Signals) -> Selection:
    """Random: a uniform draw ranks each sample's response tokens; top ceil(rho * n) kept. Seeded per micro-batch."""
    response = s.layout.response
    generator = torch.Generator(device=response.device).manual_seed(s.seed)
    score = torch.rand(response.shape, generator=generator, device=response.device)
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(score, segment, response, num_segments, config.select_ratio)
    return Selection(torch.where(response, score, 0.0), keep)  # continuous draws: no ties to break


def rho1(config: SSTokenConfig, s: Signals) -> Selection:
    """RHO-1: excess loss L_cur - L_ref = -(log p_cur - log p_ref) = -REL against the reference (history) model."""
    excess = -s.rel
    response = s.layout.response
    finite = response & excess.isfinite()
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(torch.nan_to_num(excess), segment, finite, num_segments, config.select_ratio, response, s.seed)
    stats = {"excess_loss_mean": mean_over(excess, finite), "nonfinite_rel_tokens": ((response & ~finite).sum(), None)}
    return Selection(torch.where(finite, excess, 0.0), keep, stats=stats)


def truncate(config: SSTokenConfig, s: Signals, suspicion: torch.Tensor, suspect: torch.Tensor, name: str) -> Selection:
    """Drop the `suspect` response tokens, most suspicious first, while at least ceil(rho * n) tokens of the segment
    stay kept; with protect_response_end a response's last token never is. The score is the suspicion, reported as
    `name` over kept and dropped tokens, with the share dropped and of segments whose cap bound."""
    response = s.layout.response
    suspect = suspect & response
    if config.protect_response_end:
        suspect &= ~response_ends(response, s.layout.sample_ids())
    safety = torch.where(suspect, -suspicion, torch.inf)  # kept first: every non-suspect, then the least suspect
    segment, num_segments = s.layout.segments(config.scope)
    keep = top_ratio(safety, segment, response, num_segments, config.select_ratio, response, s.seed)
    keep = keep | (response & ~suspect)
    dropped = response & ~keep
    finite = suspicion.isfinite()
    capped = torch.zeros(num_segments + 1, dtype=torch.long, device=keep.device)
    capped.scatter_add_(0, torch.where(suspect & keep, segment, num_segments).reshape(-1), suspect.reshape(-1).long())
    has_response = torch.zeros_like(capped).scatter_add_(
        0, torch.where(response, segment, num_segments).reshape(-1), response.reshape(-1).long()
    )
    stats = {
        f"{name}_kept_mean": mean_over(suspicion, keep & finite),
        f"{name}_dropped_mean": mean_over(suspicion, dropped & finite),
        "dropped_fraction": (dropped.sum(), response.sum()),
        "cap_bound_fraction": ((capped[:-1] > 0).sum(), (has_response[:-1] > 0).sum()),
        f"nonfinite_{name}_tokens": ((response & ~finite).sum(), None),
    }
    return Selection(torch.where(response, suspicion, 0.0), keep, stats=stats)


def loss_truncation(config: SSTokenConfig, s: Signals) -> Selection:
    """Loss truncation against a self-reference (the history model: a plain-SFT run on the same data).

    A token is suspect when L_ref > c * log(V) (c = truncation_loss): after a whole run of training on it the
    reference still rates it below a uniform guess. The score is L_ref; a non-finite L_ref is suspect first.
    """
    if s.logp_cur is None or s.vocab_size < 2:
        raise ValueError("loss_truncation needs the current log-probs and the model's vocabulary size.")
    ref_loss = torch.nan_to_num(s.rel - s.logp_cur, nan=torch.inf)  # REL - log p_cur = -log p_ref = L_ref
    threshold = config.truncation_loss * math.log(s.vocab_size)
    return truncate(config, s, ref_loss, ref_loss > threshold, "ref_loss")


def surprise(s: Signals) -> torch.Tensor:
    """L_cur - H_cur: how much less likely the token is than the model being trained expects at its position."""
    if s.logp_cur is None or s.entropy is None:
        raise ValueError("self_truncation needs the current log-probs and entropy (TRL's fused LM head outputs).")
    return torch.nan_to_num(-s.logp_cur - s.entropy, nan=torch.inf)


def self_truncation(config: SSTokenConfig, s: Signals) -> Selection:
    """Loss truncation inside one run, against the model being trained: no history model, no extra forward.

    A token is suspect when its loss exceeds the model's own predictive entropy there by more than c nats
    (L_cur - H_cur > c, c = surprise_nats): the model expects to pay H_cur at that position, and a token it
    finds e^c times less likely than it expects contradicts what it has learned from the rest of the data. The
    score is that surprise, L_cur - H_cur. Start it after a selection warm-up (select_warmup_ratio), once the
    model has learned what the data agrees on.
    """
    value = surprise(s)
    return truncate(config, s, value, value > config.surprise_nats, "surprise")


def entropy_weighted(config: SSTokenConfig, s: Signals) -> Selection:
    """An entropy-weighted loss like EAFT: every response token is kept, its loss weighted by H_cur / log(20)
    capped at 1 (EAFT weighs by the entropy of the top-20 probabilities over log 20; the fused LM head gives the
    entropy of the whole distribution, which is at least as large, hence the cap). Confident tokens weigh little,
    whether the model is right or wrong about them."""
    if s.entropy is None:
        raise ValueError("entropy_weighted needs the current entropy (TRL's fused LM head output).")
    response = s.layout.response
    weight = (s.entropy.detach().float() / math.log(ENTROPY_TOP_K)).clamp(0.0, 1.0)
    stats = {"loss_weight_mean": mean_over(weight, response), "entropy_mean": mean_over(s.entropy.float(), response)}
    return Selection(torch.where(response, weight, 0.0), response, weight=weight, stats=stats)


ENTROPY_TOP_K = 20  # EAFT's k: the entropy that weighs 1 is that of a uniform guess among 20 tokens


def _never(config: SSTokenConfig, gamma: float) -> bool:
    return False


def _always(config: SSTokenConfig, gamma: float) -> bool:
    return True


@dataclass(frozen=True)
class Selector:
    select: Callable[[SSTokenConfig, Signals], Selection]
    needs_history: Callable[[SSTokenConfig, float], bool]  # given the config and this step's gamma
    needs_attention: Callable[[SSTokenConfig, float], bool]
    keeps_all: bool = False
    counts_all: bool = False  # the kept number is known only after the forward: the budget counts every token


SELECTORS: dict[str, Selector] = {
    "sstoken": Selector(
        sstoken, needs_history=lambda config, gamma: gamma > 0, needs_attention=lambda config, gamma: gamma < 1
    ),
    "full": Selector(full, needs_history=_never, needs_attention=_never, keeps_all=True),
    "random": Selector(uniform_random, needs_history=_never, needs_attention=_never),
    "rho1": Selector(rho1, needs_history=_always, needs_attention=_never),
    "loss_truncation": Selector(loss_truncation, needs_history=_always, needs_attention=_never, counts_all=True),
    "self_truncation": Selector(self_truncation, needs_history=_never, needs_attention=_never, counts_all=True),
    "entropy_weighted": Selector(entropy_weighted, needs_history=_never, needs_attention=_never, counts_all=True),
}


OFFLINE_SELECTORS = ("token_cleaning",)  # select once before training (token_cleaning.py), then train "full"


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise ValueError(f"Unknown selector {name!r}; choose one of {', '.join(map(repr, SELECTORS))}.")
    return SELECTORS[name]


def uses_history(config: SSTokenConfig) -> bool:
    """Whether training will ever need history log-probs (the REL warm-up only lowers gamma to 0)."""
    return get_selector(config.selector).needs_history(config, config.gamma)


def budget_ratio(config: SSTokenConfig) -> float:
    """Share of response tokens the trainer's token count must cover: 1 for "full", when tokens above
    rel_keep_threshold are kept too (their number is known only after the forward) and when dropped tokens still
    weigh `drop_weight` (the loss is then a weighted sum over every response token), else rho."""
    selector = get_selector(config.selector)
    if selector.keeps_all or selector.counts_all or config.rel_keep_threshold is not None or config.drop_weight > 0:
        return 1.0
    return config.select_ratio


def soften(selection: Selection, response: torch.Tensor, logp_cur: torch.Tensor, drop_weight: float) -> Selection:
    """The selection with its dropped response tokens kept at loss weight `drop_weight` (a token whose log-prob is
    not finite stays dropped): a token the selection wrongly leaves out still trains, slower, and is never starved."""
    soft = response & ~selection.keep & logp_cur.isfinite()
    base = torch.ones_like(logp_cur) if selection.weight is None else selection.weight
    weight = torch.where(soft, drop_weight, base)
    return Selection(selection.score, selection.keep | soft, selection.keep_rel | soft, weight, selection.stats)


def micro_batch_seed(seed: int, global_step: int, micro_batch: int) -> int:
    """A seed fixed by (seed, optimizer step, micro-batch in the step, process rank): reproducible, also on resume."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    digest = hashlib.blake2b(f"{seed}/{global_step}/{micro_batch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
