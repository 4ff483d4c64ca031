"""Selection math against a plain per-sample loop written from the paper's equations."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from sstoken_trl.config import SSTokenConfig
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.budget import SelectionBudget
from sstoken_trl.selection.equations import kept_count, minmax_normalise, top_ratio
from sstoken_trl.selection.selectors import sstoken_select
from tests.reference import reference_select


def random_batch(seed, b=4, t=13):
    g = torch.Generator().manual_seed(seed)
    response = torch.rand(b, t, generator=g) > 0.35
    rel_values = torch.randn(b, t, generator=g)
    attn = torch.rand(b, t, generator=g)
    labels = torch.full((b, t + 1), -100)
    labels[:, 1:][response] = 5
    return labels, rel_values, attn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma,rho", [(0.5, 0.6), (1.0, 0.3), (0.0, 0.8), (0.25, 1.0), (0.7, 0.1)])
def test_select_matches_reference_loop(seed, gamma, rho):
    labels, rel_values, attn = random_batch(seed)
    layout = batch_layout(labels, attention_mask=torch.ones_like(labels))
    _, keep, _ = sstoken_select(SSTokenConfig(select_ratio=rho, gamma=gamma), layout, rel_values, attn, gamma)
    assert torch.equal(keep, reference_select(rel_values, attn, layout.response, gamma, rho))


def test_constant_rel_is_not_nan_and_equal_scores_are_kept_before_lower_ones():
    labels = torch.tensor([[-100, 7, 7, 7, 7, 7]])
    layout = batch_layout(labels)
    rel_values = torch.full((1, 5), 3.0)  # constant REL: normalised to 0, not NaN
    attn = torch.tensor([[0.2, 0.5, 0.2, 0.5, 0.2]])
    for seed in range(8):
        score, keep, _ = sstoken_select(SSTokenConfig(select_ratio=0.6, gamma=0.5), layout, rel_values, attn, 0.5, seed)
        assert torch.isfinite(score).all()
        assert keep[0, 1] and keep[0, 3] and int(keep.sum()) == 3  # 0.5, 0.5, then one of the 0.2


def test_single_response_token_is_kept_and_empty_sample_keeps_nothing():
    labels = torch.tensor([[-100, -100, -100, 4], [-100, -100, -100, -100]])
    layout = batch_layout(labels)
    _, keep, _ = sstoken_select(SSTokenConfig(select_ratio=0.1), layout, torch.randn(2, 3), torch.rand(2, 3), 0.5)
    assert keep.tolist() == [[False, False, True], [False, False, False]]


def test_kept_count_is_exact_for_decimal_ratios():
    n = torch.arange(0, 200)
    for rho in (0.1, 0.3, 0.6, 0.7, 0.8, 1.0):
        expected = [math.ceil(Fraction(str(rho)) * int(v)) for v in n]
        assert kept_count(n, rho).tolist() == expected


def test_minmax_is_per_segment():
    values = torch.tensor([[1.0, 3.0, 2.0, 10.0, 20.0, 0.0]])
    segment = torch.tensor([[0, 0, 0, 1, 1, 1]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    normed = minmax_normalise(values, segment, mask, 2)
    assert torch.allclose(normed, torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_packed_documents_are_selected_separately():
    # One row, two documents (positions restart), as TRL's padding-free collator builds it.
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([[-100, -100, 5, 5, 5, -100, -100, 5, 5, 5, 5]])
    layout = batch_layout(labels, position_ids=position_ids)
    g = torch.Generator().manual_seed(0)
    rel_values, attn = torch.randn(1, 10, generator=g), torch.rand(1, 10, generator=g)
    _, keep, _ = sstoken_select(SSTokenConfig(select_ratio=0.5), layout, rel_values, attn, 0.5)
    # The same as selecting in each document as its own row.
    split = torch.zeros_like(keep)
    for start, stop in ((0, 4), (5, 10)):
        response = layout.response[:, start:stop]
        split[:, start:stop] = reference_select(rel_values[:, start:stop], attn[:, start:stop], response, 0.5, 0.5)
    assert torch.equal(keep, split)
    assert keep[:, :4].sum() == 2 and keep[:, 5:].sum() == 2


def test_batch_scope_keeps_top_ratio_of_the_micro_batch():
    labels, rel_values, attn = random_batch(3)
    layout = batch_layout(labels)
    config = SSTokenConfig(select_ratio=0.4, scope="batch")
    score, keep, _ = sstoken_select(config, layout, rel_values, attn, 0.5)
    n = int(layout.response.sum())
    assert int(keep.sum()) == math.ceil(0.4 * n)
    assert score[keep].min() >= score[layout.response & ~keep].max()


def test_non_finite_rel_is_never_kept():
    labels = torch.tensor([[-100, 5, 5, 5, 5]])
    layout = batch_layout(labels)
    rel_values = torch.tensor([[torch.nan, 1.0, torch.inf, 0.5]])
    _, keep, _ = sstoken_select(SSTokenConfig(select_ratio=1.0), layout, rel_values, torch.ones(1, 4), 0.5)
    assert keep.tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_budget_counts_exactly_the_tokens_selection_keeps(scope):
    labels, rel_values, attn = random_batch(5)
    budget = SelectionBudget(lambda examples: {"labels": labels.clone()}, 0.6, scope)
    batch = budget([])
    assert torch.equal(batch["sstoken_labels"], labels)
    counted = batch["labels"][:, 1:] != -100
    layout = batch_layout(labels)
    _, keep, _ = sstoken_select(SSTokenConfig(select_ratio=0.6, scope=scope), layout, rel_values, attn, 0.5)
    segment, _ = layout.segments(scope)
    for s in segment.unique():
        in_segment = segment == s
        assert int((counted & in_segment).sum()) == int((keep & in_segment).sum())
    assert not (counted & ~layout.response).any()


def test_top_ratio_on_many_samples_at_once():
    # 512 samples in one vectorised call keep exactly ceil(rho * n) each.
    g = torch.Generator().manual_seed(0)
    score = torch.rand(512, 64, generator=g)
    mask = torch.rand(512, 64, generator=g) > 0.5
    segment = torch.arange(512)[:, None].expand(512, 64)
    keep = top_ratio(score, segment, mask, 512, 0.6)
    counts = mask.sum(1)
    assert torch.equal(keep.sum(1), kept_count(counts, 0.6))
