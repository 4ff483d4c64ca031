"""ssToken selection as tensor math (paper Eq. 3-11), vectorised over the batch.

Every function works on target positions of shape (B, T-1) with a boolean `response` mask and a `segment`
id per position (the sample, or the whole micro-batch). No Python loop over samples and no host sync.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def rel(logp_cur: torch.Tensor, logp_his: torch.Tensor) -> torch.Tensor:
    """REL(x_i) = L_his - L_cur = log p_cur(x_i | x<i) - log p_his(x_i | x<i)."""
    return logp_cur - logp_his


def clipped_rel(rel_values: torch.Tensor, logp_cur: torch.Tensor, his_loss_clip: float) -> torch.Tensor:
    """min(L_his, clip) - L_cur, from REL = L_his - L_cur and log p_cur = -L_cur."""
    return torch.minimum(rel_values, his_loss_clip + logp_cur)


def _masked_segments(segment: torch.Tensor, mask: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Flattened segment ids with masked-out positions moved to a spare segment `num_segments`."""
    return torch.where(mask, segment, num_segments).reshape(-1)


def minmax_normalise(
    values: torch.Tensor, segment: torch.Tensor, mask: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """(v - min) / (max - min + eps) within each segment; a constant segment maps to 0, never NaN."""
    seg = _masked_segments(segment, mask, num_segments)
    flat = torch.where(mask, values, 0.0).reshape(-1)
    empty = flat.new_zeros(num_segments + 1)
    lo = empty.scatter_reduce(0, seg, flat, "amin", include_self=False)
    hi = empty.scatter_reduce(0, seg, flat, "amax", include_self=False)
    normed = (flat - lo[seg]) / (hi[seg] - lo[seg] + EPS)
    return torch.where(mask, normed.view_as(values), 0.0)


def no_normalise(values: torch.Tensor, segment: torch.Tensor, mask: torch.Tensor, num_segments: int) -> torch.Tensor:
    """REL as it is, in nats: comparable across samples, so scope="batch" selects on one threshold."""
    return torch.where(mask, values, 0.0)


def combine(rel_norm: torch.Tensor, attn_score: torch.Tensor, gamma: float) -> torch.Tensor:
    """Score(x_i) = gamma * REL'(x_i) + (1 - gamma) * AttnScore(x_i)."""
    return gamma * rel_norm + (1.0 - gamma) * attn_score


def kept_count(n: torch.Tensor, select_ratio: float) -> torch.Tensor:
    """ceil(rho * n), exact for decimal rho (a float product like 0.7 * 10 is 7.000000000000001)."""
    return torch.ceil(n.double() * select_ratio - 1e-9).long()


def response_ends(response: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """The last target position of each response span (its end-of-sequence / end-of-turn token)."""
    following = torch.zeros_like(response)
    following[:, :-1] = response[:, 1:] & (segment[:, 1:] == segment[:, :-1])
    return response & ~following


def rank_normalise(values: torch.Tensor, segment: torch.Tensor, mask: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Percentile rank within each segment, (rank) / (n - 1) in [0, 1]; equal values share their mean rank.

    Unlike min-max, one outlier moves the others by at most one rank step, never squeezes them together.
    """
    seg = _masked_segments(segment, mask, num_segments)
    flat = torch.where(mask, values, 0.0).reshape(-1)
    by_value = torch.sort(flat, stable=True).indices
    order = by_value[torch.sort(seg[by_value], stable=True).indices]
    sorted_values, sorted_seg = flat[order], seg[order]
    new_group = torch.ones_like(sorted_seg, dtype=torch.bool)
    new_group[1:] = (sorted_values[1:] != sorted_values[:-1]) | (sorted_seg[1:] != sorted_seg[:-1])
    group = new_group.long().cumsum(0) - 1
    position = torch.arange(flat.numel(), device=flat.device, dtype=torch.double)
    empty = position.new_zeros(flat.numel())
    first = empty.scatter_reduce(0, group, position, "amin", include_self=False)
    last = empty.scatter_reduce(0, group, position, "amax", include_self=False)
    counts = torch.zeros(num_segments + 1, dtype=torch.long, device=seg.device).scatter_add_(
        0, seg, torch.ones_like(seg)
    )
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(position)
    rank[order] = (first[group] + last[group]) / 2 - starts[sorted_seg]
    normed = (rank / (counts[seg] - 1).clamp(min=1)).to(values.dtype)
    return torch.where(mask, normed.view_as(values), 0.0)


def top_ratio(
    score: torch.Tensor,
    segment: torch.Tensor,
    mask: torch.Tensor,
    num_segments: int,
    select_ratio: float,
    budget: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Keep the top ceil(rho * n) masked positions of each segment by score.

    n counts the `budget` positions (default: `mask`), so candidates excluded from `mask` (non-finite scores)
    still count toward the kept number, which is then filled from the candidates. Ties are broken by a random
    order drawn from `seed`; with no seed they go to the earlier position.
    """
    seg = _masked_segments(segment, mask, num_segments)
    flat = torch.where(mask, score, -torch.inf).reshape(-1)
    # Order by score (descending), then stably by segment: each segment's positions become one run, best first.
    if seed is None:
        by_score = torch.sort(flat, descending=True, stable=True).indices
    else:
        generator = torch.Generator(device=flat.device).manual_seed(seed)
        shuffle = torch.randperm(flat.numel(), generator=generator, device=flat.device)
        by_score = shuffle[torch.sort(flat[shuffle], descending=True, stable=True).indices]
    order = by_score[torch.sort(seg[by_score], stable=True).indices]
    counts = torch.zeros(num_segments + 1, dtype=torch.long, device=seg.device).scatter_add_(
        0, seg, torch.ones_like(seg)
    )
    budget_seg = _masked_segments(segment, mask if budget is None else budget, num_segments)
    budget_counts = torch.zeros_like(counts).scatter_add_(0, budget_seg, torch.ones_like(budget_seg))
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(seg)
    rank[order] = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]]
    keep = rank < kept_count(budget_counts, select_ratio)[seg]
    return keep.view_as(mask) & mask


def first_ratio(segment: torch.Tensor, mask: torch.Tensor, num_segments: int, select_ratio: float) -> torch.Tensor:
    """The first ceil(rho * n) masked positions of each segment: as many tokens as `top_ratio` keeps."""
    position = torch.arange(mask.numel(), device=mask.device, dtype=torch.double).view_as(mask)
    return top_ratio(-position, segment, mask, num_segments, select_ratio)
