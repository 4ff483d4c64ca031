"""The paper's baselines as selectors: full, random, RHO-1, and ssToken with gamma 1 (REL only) / 0 (attention only)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.budget import REAL_LABELS, SelectionBudget
from sstoken_trl.selection.selectors import SELECTORS, Signals, budget_ratio, get_selector, micro_batch_seed
from sstoken_trl.tools.tiny import build_model
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.reference import token_log_probs


def top_k_loop(values: torch.Tensor, response: torch.Tensor, rho: float) -> torch.Tensor:
    """Per row: keep the ceil(rho n) response positions with the highest value, ties to the earlier position."""
    keep = torch.zeros_like(response)
    for b in range(response.size(0)):
        idx = [t for t in range(response.size(1)) if response[b, t]]
        k = math.ceil(Fraction(str(rho)) * len(idx))
        for t in sorted(idx, key=lambda t: (-values[b, t].item(), t))[:k]:
            keep[b, t] = True
    return keep


def batch(seed: int = 0):
    """Three padded rows with different prompt / response lengths, one with an empty response."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, 50, (3, 12), generator=g)
    attention_mask = torch.ones_like(labels)
    labels[0, :4] = -100
    labels[1, :7] = -100
    attention_mask[1, 10:] = 0
    labels[1, 10:] = -100
    labels[2, :] = -100
    layout = batch_layout(labels, attention_mask)
    shape = layout.response.shape
    return layout, torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(shape, generator=g)


@pytest.mark.parametrize("rho", [0.3, 0.6, 1.0])
def test_rho1_keeps_the_top_excess_loss_of_each_sample(rho):
    layout, logp_cur, logp_ref, _ = batch()
    config = SSTokenConfig(selector="rho1", select_ratio=rho)
    signals = Signals(layout, logp_cur - logp_ref, torch.zeros_like(logp_cur), gamma=0.5, seed=0)
    score, keep, _ = get_selector("rho1").select(config, signals)
    excess = -logp_cur - -logp_ref  # L_cur - L_ref, RHO-1's excess loss
    assert torch.equal(keep, top_k_loop(excess, layout.response, rho))
    torch.testing.assert_close(score, torch.where(layout.response, excess, 0.0))


def test_gamma_one_ranks_by_rel_alone_and_gamma_zero_by_attention_alone():
    layout, rel_values, _, attn = batch(1)
    for gamma, ranked_by, ignored in ((1.0, rel_values, "attn"), (0.0, attn, "rel")):
        config = SSTokenConfig(gamma=gamma, select_ratio=0.5)
        _, keep, _ = get_selector("sstoken").select(config, Signals(layout, rel_values, attn, gamma, 0))
        assert torch.equal(keep, top_k_loop(ranked_by, layout.response, 0.5))
        noise = torch.randn_like(attn)  # changing the unused signal changes nothing
        other = (rel_values, attn + noise) if ignored == "attn" else (rel_values + noise, attn)
        _, keep_other, _ = get_selector("sstoken").select(config, Signals(layout, *other, gamma, 0))
        assert torch.equal(keep, keep_other)


def test_each_selector_asks_only_for_the_signals_it_uses():
    config = SSTokenConfig()
    needs = {name: (s.needs_history(config, 0.5), s.needs_attention(config, 0.5)) for name, s in SELECTORS.items()}
    assert needs == {
        "sstoken": (True, True),
        "full": (False, False),
        "random": (False, False),
        "rho1": (True, False),
        "loss_truncation": (True, False),
        "self_truncation": (False, False),
        "entropy_weighted": (False, False),
    }
    sstoken = SELECTORS["sstoken"]
    assert not sstoken.needs_history(config, 0.0) and sstoken.needs_attention(config, 0.0)
    assert sstoken.needs_history(config, 1.0) and not sstoken.needs_attention(config, 1.0)


def test_full_keeps_every_response_token_and_the_budget_counts_them_all():
    layout, rel_values, _, attn = batch()
    config = SSTokenConfig(selector="full", select_ratio=0.3)
    _, keep, _ = get_selector("full").select(config, Signals(layout, rel_values, attn, 0.5, 0))
    assert torch.equal(keep, layout.response)
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, 9]])

    def collate(_):
        return {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}

    counted = SelectionBudget(collate, budget_ratio(config), "sample")([])
    assert budget_ratio(config) == 1.0 and budget_ratio(SSTokenConfig(select_ratio=0.3)) == 0.3
    assert torch.equal(counted["labels"], counted[REAL_LABELS])


def test_random_is_uniform_seeded_and_keeps_ceil_rho_n():
    layout, rel_values, _, attn = batch()
    config = SSTokenConfig(selector="random", select_ratio=0.3)
    select = get_selector("random").select

    def keep(seed):
        return select(config, Signals(layout, rel_values, attn, 0.5, seed))[1]

    assert torch.equal(keep(7), keep(7))
    assert not torch.equal(keep(7), keep(8))
    expected = torch.ceil(0.3 * layout.response.sum(1) - 1e-9).long()
    draws = torch.stack([keep(micro_batch_seed(0, step, 0)) for step in range(600)])
    assert all(torch.equal(d.sum(1), expected) for d in draws)
    assert not (draws & ~layout.response).any()
    # Each response position of a sample is kept with probability k / n: uniform, within 4 standard deviations.
    frequency = draws.float().mean(0)
    p = (expected / layout.response.sum(1).clamp(min=1))[:, None].expand_as(frequency)
    tolerance = 4 * (p * (1 - p) / len(draws)).sqrt()
    assert ((frequency - p).abs() <= tolerance)[layout.response].all()


def test_micro_batch_seeds_differ_by_step_and_micro_batch():
    seeds = {micro_batch_seed(0, step, micro) for step in range(20) for micro in range(4)}
    assert len(seeds) == 80
    assert micro_batch_seed(3, 5, 1) == micro_batch_seed(3, 5, 1) != micro_batch_seed(4, 5, 1)


def train(tokenizer, config: SSTokenConfig | None, lora: bool = True, **overrides):
    args = cpu_sft_args(
        **(
            {
                "output_dir": "/tmp/sstoken-test-selectors",
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "learning_rate": 0.0,
                "logging_steps": 1,
            }
            | overrides
        )
    )
    sstoken = SSTokenCallback(config, history_model=args.pop("history_model", None)) if config else None
    trainer = SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(**args),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if lora else None,
        callbacks=[sstoken] if sstoken else [],
    )
    trainer.train()
    return trainer, sstoken


def test_full_selector_trains_exactly_like_plain_sft(tokenizer):
    plain, _ = train(tokenizer, None, lora=False, learning_rate=1e-2)
    full, sstoken = train(tokenizer, SSTokenConfig(selector="full"), lora=False, learning_rate=1e-2)
    assert sstoken.history is None  # full fine-tuning, and no history needed
    for a, b in zip(plain.state.log_history[:2], full.state.log_history[:2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert b["sstoken/selected_fraction"] == 1.0
    for (name, p), q in zip(plain.model.named_parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_rho1_against_a_reference_model_in_training(tokenizer):
    reference = build_model("llama", len(tokenizer), seed=5)
    config = SSTokenConfig(selector="rho1", history="model", select_ratio=0.5)
    trainer, sstoken = train(tokenizer, config, history_model=reference)
    last = sstoken.last_selection
    assert not last.attn_score.any()  # no attention score computed for RHO-1
    inputs = {"input_ids": last.input_ids, "attention_mask": (last.input_ids != tokenizer.pad_token_id).long()}
    with torch.no_grad():
        model = trainer.model.eval()
        logp_cur = token_log_probs(model(**inputs).logits, last.input_ids)  # learning rate 0: weights unchanged
        logp_ref = token_log_probs(reference(**inputs).logits, last.input_ids)
    excess = logp_ref - logp_cur  # L_cur - L_ref
    assert torch.equal(last.keep, top_k_loop(excess, last.response, 0.5))
    assert not torch.equal(last.keep, top_k_loop(-excess, last.response, 0.5))  # the sign matters


def test_gamma_zero_needs_no_history_even_without_peft(tokenizer):
    _, sstoken = train(tokenizer, SSTokenConfig(gamma=0.0, select_ratio=0.5), lora=False)
    last = sstoken.last_selection
    assert sstoken.history is None and not last.rel.any()
    assert torch.equal(last.keep, top_k_loop(last.attn_score, last.response, 0.5))


def test_random_selector_is_reproducible_across_runs(tokenizer):
    keeps = []
    for _ in range(2):
        _, sstoken = train(tokenizer, SSTokenConfig(selector="random", seed=3), lora=False)
        keeps.append(sstoken.last_selection.keep)
        assert sstoken.history is None and not sstoken.last_selection.attn_score.any()
    assert torch.equal(keeps[0], keeps[1])
