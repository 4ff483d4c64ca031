"""The selection fixes and the variants of the REL signal: each against a plain loop or exact counts."""

from __future__ import annotations

import math

import pytest
import torch

from sstoken_trl.config import RECOMMENDED, SSTokenConfig
from sstoken_trl.integration.selective_forward import SelectiveForward
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.budget import SelectionBudget
from sstoken_trl.selection.equations import clipped_rel, rank_normalise, response_ends
from sstoken_trl.selection.selectors import Signals, budget_ratio, get_selector, sstoken_select


def budget_counts(labels: torch.Tensor, rho: float) -> torch.Tensor:
    """Tokens per row that SelectionBudget tells the trainer will be kept."""
    batch = SelectionBudget(lambda examples: {"labels": labels.clone()}, rho, "sample")([])
    return (batch["labels"][:, 1:] != -100).sum(1)


def test_ties_are_broken_by_the_micro_batch_seed_not_by_position():
    # REL is exactly 0 when history == current model (first step): every token ties.
    labels = torch.tensor([[-100] + [5] * 10])
    layout = batch_layout(labels)
    zeros = torch.zeros(1, 10)
    config = SSTokenConfig(select_ratio=0.6, gamma=1.0)
    kept = [get_selector("sstoken").select(config, Signals(layout, zeros, zeros, 1.0, seed))[1] for seed in range(20)]
    assert all(int(k.sum()) == 6 for k in kept)
    assert any(k[0, -1] for k in kept), "the tail is never kept: ties went to the earlier positions"
    assert len({tuple(k[0].tolist()) for k in kept}) > 10
    again = get_selector("sstoken").select(config, Signals(layout, zeros, zeros, 1.0, 3))[1]
    assert torch.equal(again, kept[3])  # reproducible from the seed


def test_rho1_ties_are_broken_by_the_seed_too():
    labels = torch.tensor([[-100] + [5] * 10])
    layout = batch_layout(labels)
    zeros = torch.zeros(1, 10)
    kept = [
        get_selector("rho1").select(SSTokenConfig(), Signals(layout, zeros, zeros, 0.5, seed))[1] for seed in range(20)
    ]
    assert any(k[0, -1] for k in kept)


@pytest.mark.parametrize("selector", ["sstoken", "rho1"])
def test_non_finite_rel_counts_in_the_budget_and_is_never_kept(selector):
    labels = torch.tensor([[-100] + [5] * 10, [-100, -100] + [5] * 9])
    layout = batch_layout(labels)
    rel_values = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    rel_values[0, [1, 4, 7]] = torch.tensor([torch.nan, torch.inf, -torch.inf])
    config = SSTokenConfig(select_ratio=0.5, selector=selector)
    _, keep, _ = get_selector(selector).select(config, Signals(layout, rel_values, torch.rand(2, 10), 0.5, 0))
    assert not keep[0, [1, 4, 7]].any()
    assert keep.sum(1).tolist() == budget_counts(labels, 0.5).tolist() == [5, 5]  # ceil(0.5 * 10), ceil(0.5 * 9)


def test_response_ends_are_the_last_token_of_each_span():
    # Sample 0: two assistant turns; sample 1: one turn; padded rows.
    labels = torch.tensor([[-100, -100, 5, 5, 2, -100, -100, 6, 2], [-100, -100, -100, 5, 5, 5, 2, -100, -100]])
    layout = batch_layout(labels)
    ends = response_ends(layout.response, layout.sample_ids())
    expected = torch.zeros_like(ends)
    expected[0, [3, 7]] = True
    expected[1, 5] = True
    assert torch.equal(ends, expected)
    assert (labels[:, 1:][ends] == 2).all()  # each is the turn's </s>


def test_packed_documents_each_end_their_response():
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    labels = torch.tensor([[-100, -100, 5, 2, -100, -100, 6, 2]])
    layout = batch_layout(labels, position_ids=position_ids)
    ends = response_ends(layout.response, layout.sample_ids())
    assert ends[0].nonzero().flatten().tolist() == [2, 6]


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("seed", range(4))
def test_protected_end_is_always_kept_and_the_kept_count_equals_the_budget(gamma, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(
        [[-100, -100, 5, 5, 5, 2, -100, 6, 6, 6, 6, 2], [-100, -100, -100, 5, 5, 5, 5, 5, 5, 5, 5, 2]]
    )
    layout = batch_layout(labels)
    rel_values, attn = torch.randn(2, 11, generator=g), torch.rand(2, 11, generator=g)
    ends = response_ends(layout.response, layout.sample_ids())
    rel_values[ends], attn[ends] = -100.0, 0.0  # the worst score of its sample: dropped without protection
    config = SSTokenConfig(select_ratio=0.3, gamma=gamma, protect_response_end=True)
    _, keep, keep_rel = sstoken_select(config, layout, rel_values, attn, gamma, seed)
    assert keep[ends].all() and keep_rel[ends].all()
    assert keep.sum(1).tolist() == budget_counts(labels, 0.3).tolist() == [3, 3]
    _, paper, _ = sstoken_select(SSTokenConfig(select_ratio=0.3, gamma=gamma), layout, rel_values, attn, gamma, seed)
    if gamma > 0:
        assert not paper[ends].any()


def rank_loop(values: list[float]) -> list[float]:
    """Percentile of each value within the list, ties sharing their mean rank."""
    n = len(values)
    out = []
    for v in values:
        below = sum(u < v for u in values)
        equal = sum(u == v for u in values)
        out.append((below + (equal - 1) / 2) / max(n - 1, 1))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_rank_normalise_matches_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (3, 9), generator=g).float()  # many ties
    values[0, 2] = 1e6  # an outlier moves the others by one rank at most
    mask = torch.rand(3, 9, generator=g) > 0.3
    segment = torch.arange(3)[:, None].expand(3, 9)
    normed = rank_normalise(values, segment, mask, 3)
    for b in range(3):
        idx = mask[b].nonzero().flatten().tolist()
        expected = rank_loop([values[b, t].item() for t in idx])
        assert normed[b, idx].tolist() == pytest.approx(expected)
        assert (normed[b][~mask[b]] == 0).all()


def test_rank_norm_changes_the_mix_with_attention_not_the_rel_order():
    labels = torch.tensor([[-100] + [5] * 6])
    layout = batch_layout(labels)
    rel_values = torch.tensor([[50.0, 0.3, 0.2, 0.1, 0.0, -0.1]])  # one outlier squeezes min-max
    attn = torch.tensor([[0.0, 0.0, 0.1, 0.2, 0.45, 0.3]])
    rank = SSTokenConfig(select_ratio=0.5, rel_norm="rank")
    _, keep_rank, keep_rel = sstoken_select(rank, layout, rel_values, attn, 0.5)
    _, keep_minmax, _ = sstoken_select(SSTokenConfig(select_ratio=0.5), layout, rel_values, attn, 0.5)
    assert keep_rel[0].tolist() == [True, True, True, False, False, False]
    assert keep_minmax[0].tolist() == [True, False, False, False, True, True]  # REL beyond the outlier is flat
    # ranks [1, .8, .6, .4, .2, 0]: scores [.5, .4, .35, .3, .325, .15]
    assert keep_rank[0].tolist() == [True, True, True, False, False, False]


def test_clipped_rel_is_min_of_his_loss_and_clip_minus_cur_loss():
    loss_cur = torch.tensor([[0.5, 2.0, 4.0]])
    loss_his = torch.tensor([[1.0, 9.0, 3.0]])
    clipped = clipped_rel(loss_his - loss_cur, -loss_cur, 3.5)
    assert clipped[0].tolist() == pytest.approx([0.5, 1.5, -1.0])  # min(L_his, 3.5) - L_cur


def test_clip_reaches_the_selector_through_the_current_log_probs():
    labels = torch.tensor([[-100] + [5] * 4])
    layout = batch_layout(labels)
    loss_cur = torch.tensor([[1.0, 0.2, 3.0, 0.5]])
    loss_his = torch.tensor([[20.0, 2.5, 3.5, 1.0]])  # token 0: the history is confidently wrong
    signals = Signals(layout, loss_his - loss_cur, torch.zeros(1, 4), 1.0, 0, -loss_cur, vocab_size=20)
    _, unclipped, _ = get_selector("sstoken").select(SSTokenConfig(select_ratio=0.25, gamma=1.0), signals)
    assert unclipped[0].tolist() == [True, False, False, False]  # REL [19, 2.3, 0.5, 0.5]
    config = SSTokenConfig(select_ratio=0.25, gamma=1.0, his_loss_clip=1.0)  # log(20) = 3.0 nats
    _, clipped, _ = get_selector("sstoken").select(config, signals)
    assert clipped[0].tolist() == [False, True, False, False]  # min(L_his, 3) - L_cur = [2, 2.8, 0, 0.5]
    with pytest.raises(ValueError, match="vocabulary size"):
        get_selector("sstoken").select(config, Signals(layout, loss_his - loss_cur, torch.zeros(1, 4), 1.0, 0))


def test_rel_warmup_ratio_resolves_against_max_steps():
    assert SSTokenConfig(rel_warmup_ratio=0.2).rel_warmup(250) == 50
    assert SSTokenConfig(rel_warmup_ratio=0.1).rel_warmup(7) == 1
    assert SSTokenConfig(rel_warmup_steps=13).rel_warmup(250) == 13
    step = SelectiveForward(lambda **kw: None, SSTokenConfig(gamma=0.7, rel_warmup_ratio=0.2), None, None, 100)
    step.global_step = 19
    assert step.gamma() == 0.0
    step.global_step = 20
    assert step.gamma() == 0.7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rel_warmup_ratio": 1.0}, "rel_warmup_ratio"),
        ({"rel_warmup_ratio": 0.2, "rel_warmup_steps": 5}, "only one"),
        ({"rel_norm": "zscore"}, "'minmax', 'rank'"),
        ({"his_loss_clip": 0.0}, "his_loss_clip"),
    ],
)
def test_bad_variant_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSTokenConfig(**kwargs)


def test_recommended_config_and_overrides():
    config = SSTokenConfig.recommended(select_ratio=0.7)
    assert config.select_ratio == 0.7
    for name, value in RECOMMENDED.items():
        assert getattr(SSTokenConfig.recommended(), name) == value != getattr(SSTokenConfig(), name)
    assert SSTokenConfig.recommended(protect_response_end=False).protect_response_end is False
    assert math.isclose(SSTokenConfig.recommended().gamma, RECOMMENDED.get("gamma", 0.5))


def test_raw_rel_over_the_batch_is_one_threshold_across_samples():
    # Two samples of 5 response tokens: a clean one (high REL) and a noisy one (low REL); top ceil(0.6 * 10) = 6.
    labels = torch.tensor([[-100] + [5] * 5, [-100] + [5] * 5])
    layout = batch_layout(labels)
    g = torch.Generator().manual_seed(0)
    rel_values = torch.cat([torch.rand(1, 5, generator=g) + 2.0, torch.rand(1, 5, generator=g) - 2.0])
    rel_values[1, 0] = 5.0  # one token of the noisy sample beats them all
    config = SSTokenConfig(select_ratio=0.6, gamma=1.0, scope="batch", rel_norm="none")
    _, keep, _ = sstoken_select(config, layout, rel_values, torch.zeros(2, 5), 1.0)
    flat = [(float(v), (row, col)) for row in range(2) for col, v in enumerate(rel_values[row])]
    expected = {where for _, where in sorted(flat, reverse=True)[:6]}  # a plain global top 6
    assert {(r, c) for r, c in keep.nonzero().tolist()} == expected
    assert keep.sum(1).tolist() == [5, 1]
    per_sample = sstoken_select(SSTokenConfig(select_ratio=0.6, gamma=1.0), layout, rel_values, torch.zeros(2, 5), 1.0)
    assert per_sample[1].sum(1).tolist() == [3, 3]  # the paper's quota: ceil(0.6 * 5) of each sample


def test_rel_keep_threshold_adds_every_token_with_rel_above_it_and_counts_all_tokens():
    labels = torch.tensor([[-100] + [5] * 6, [-100] + [5] * 6])
    layout = batch_layout(labels)
    g = torch.Generator().manual_seed(3)
    rel_values = torch.randn(2, 6, generator=g)
    rel_values[0] = rel_values[0].abs() + 0.1  # a clean sample: the model predicts every token better than before
    config = SSTokenConfig(select_ratio=0.5, gamma=1.0, rel_keep_threshold=0.0)
    _, keep, _ = sstoken_select(config, layout, rel_values, torch.zeros(2, 6), 1.0)
    for row in range(2):
        top = set(sorted(range(6), key=lambda t: -float(rel_values[row, t]))[:3])  # ceil(0.5 * 6), a plain loop
        expected = top | {t for t in range(6) if rel_values[row, t] >= 0}
        assert set(keep[row].nonzero().flatten().tolist()) == expected
    assert keep[0].all()
    assert budget_ratio(config) == 1.0 and budget_ratio(SSTokenConfig(select_ratio=0.5)) == 0.5
    _, warm_keep, _ = sstoken_select(config, layout, rel_values, torch.zeros(2, 6), 0.0)  # REL warm-up: gamma 0
    assert warm_keep.sum(1).tolist() == [3, 3]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(rel_keep_threshold=float("nan")), "finite"),
        (dict(rel_keep_threshold=float("inf")), "finite"),
        (dict(rel_keep_threshold=0.0, selector="random"), "ignores it"),
        (dict(rel_keep_threshold=0.0, selector="rho1"), "ignores it"),
        (dict(rel_keep_threshold=0.0, rel_warmup_ratio=0.2), "REL warm-up"),
        (dict(rel_keep_threshold=0.0, rel_warmup_steps=5), "REL warm-up"),
    ],
)
def test_rel_keep_threshold_is_refused_where_it_would_be_ignored(fields, match):
    with pytest.raises(ValueError, match=match):
        SSTokenConfig(**fields)
