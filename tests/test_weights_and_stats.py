"""Per-token loss weights (the entropy-weighted peer, drop_weight), the statistics each selector logs, and settings a
selector would ignore."""

from __future__ import annotations

import math

import pytest
import torch

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.selection.settings import ignored_settings
from tests.reference import token_log_probs
from tests.test_train import Probe, make_trainer


def full_logit_signals(model, batch):
    """Log-prob and entropy of every target from full logits, at the model's current weights."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    response = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    return token_log_probs(logits, batch["input_ids"]), entropy, response


def test_entropy_weighted_loss_is_the_entropy_weighted_nll_over_every_response_token(tokenizer):
    sstoken = SSTokenCallback(SSTokenConfig(selector="entropy_weighted"))
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, callbacks=[sstoken, probe], max_steps=1, gradient_accumulation_steps=2)
    trainer.train()
    model = trainer.model
    total = sum(int(((b["labels"][:, 1:] != -100) & b["attention_mask"][:, 1:].bool()).sum()) for b in probe.batches)
    loss = 0.0
    for batch in probe.batches:  # the weights at the weights the step saw: no update happened within the window
        _, entropy, response = full_logit_signals(model, batch)
        weight = (entropy / math.log(20)).clamp(max=1.0)
        # d loss / d log p = -weight / (response tokens of the window), zero off the responses
        torch.testing.assert_close(batch["grad"], torch.where(response, -weight / total, 0.0), atol=1e-6, rtol=1e-4)
        model.train()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss = loss + -(token_log_probs(out.logits, batch["input_ids"]) * weight * response).sum() / total
    assert 0 < weight[response].min() and weight[response].max() <= 1
    assert abs(trainer.state.log_history[0]["loss"] - loss.item()) < 1e-5


def test_drop_weight_trains_left_out_tokens_at_that_weight(tokenizer):
    config = SSTokenConfig(selector="self_truncation", surprise_nats=0.01, select_ratio=0.5, drop_weight=0.25)
    sstoken = SSTokenCallback(config)
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, callbacks=[sstoken, probe], max_steps=1, gradient_accumulation_steps=2)
    trainer.train()
    total = sum(int(((b["labels"][:, 1:] != -100) & b["attention_mask"][:, 1:].bool()).sum()) for b in probe.batches)
    left_out = 0
    for batch in probe.batches:
        logp, entropy, response = full_logit_signals(trainer.model, batch)
        surprise = -logp - entropy
        weight = -batch["grad"] * total  # each response token's weight in the loss
        assert torch.all(weight[~response] == 0) and torch.all(weight[response] > 0)  # nothing is starved
        down = response & (weight < 0.5)
        torch.testing.assert_close(weight[down], torch.full_like(weight[down], 0.25))
        torch.testing.assert_close(weight[response & ~down], torch.ones_like(weight[response & ~down]))
        assert (surprise[down] > 0.01).all()  # only suspects are weighed down
        left_out += int(down.sum())
    assert 0 < left_out <= total * 0.5  # at most 1 - rho of the tokens
    with pytest.raises(ValueError, match="drop_weight"):
        SSTokenConfig(drop_weight=1.0)


EXPECTED_STATS = {
    "full": set(),
    "random": set(),
    "sstoken": {"rel_mean", "nonfinite_rel_tokens", "attn_score_mean", "kept_by_attention_fraction"},
    "self_truncation": {
        "surprise_kept_mean",
        "surprise_dropped_mean",
        "dropped_fraction",
        "cap_bound_fraction",
        "nonfinite_surprise_tokens",
    },
    "entropy_weighted": {"loss_weight_mean", "entropy_mean"},
}


@pytest.mark.parametrize("selector", list(EXPECTED_STATS))
def test_each_selector_logs_the_signals_it_reads_and_nothing_zero_by_construction(tokenizer, selector):
    extra = {"surprise_nats": 0.01} if selector == "self_truncation" else {}
    sstoken = SSTokenCallback(SSTokenConfig(selector=selector, **extra))
    trainer = make_trainer(tokenizer, callbacks=[sstoken], max_steps=2, logging_steps=1)
    trainer.train()
    for logs in trainer.state.log_history[:-1]:
        logged = {k.split("/", 1)[1] for k in logs if k.startswith("sstoken/")}
        assert logged == {"selected_fraction"} | EXPECTED_STATS[selector]
        if selector == "self_truncation":  # kept tokens are the less surprising ones
            assert logs["sstoken/surprise_kept_mean"] < logs["sstoken/surprise_dropped_mean"]
            assert logs["sstoken/dropped_fraction"] == pytest.approx(1 - logs["sstoken/selected_fraction"])


def test_gamma_one_logs_no_attention_and_warmup_steps_log_only_the_kept_share(tokenizer):
    sstoken = SSTokenCallback(SSTokenConfig(gamma=1.0, select_warmup_ratio=0.5))
    trainer = make_trainer(tokenizer, callbacks=[sstoken], max_steps=2, logging_steps=1)
    trainer.train()
    warm, selecting = ({k for k in logs if k.startswith("sstoken/")} for logs in trainer.state.log_history[:2])
    assert warm == {"sstoken/selected_fraction"} and trainer.state.log_history[0]["sstoken/selected_fraction"] == 1.0
    assert selecting == {"sstoken/selected_fraction", "sstoken/rel_mean", "sstoken/nonfinite_rel_tokens"}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (dict(selector="self_truncation", history="ema"), "history='ema'"),
        (dict(selector="self_truncation", history_model="run1", rel_warmup_steps=3), "history_model='run1'"),
        (dict(selector="random", surprise_nats=2.0), "surprise_nats=2.0"),
        (dict(gamma=1.0, attn_layer=3), "attn_layer=3"),
        (dict(gamma=0.0, his_loss_clip=1.0), "his_loss_clip=1.0"),
        (dict(selector="rho1", history="model", ema_alpha=0.5), "ema_alpha=0.5"),
        (dict(selector="entropy_weighted", select_ratio=0.5), "select_ratio=0.5"),
    ],
)
def test_a_setting_the_selector_would_ignore_is_refused_by_name(settings, named):
    with pytest.raises(ValueError, match="would ignore") as refused:
        SSTokenConfig(**settings)
    assert named in str(refused.value)


def test_full_and_presets_switched_to_another_selector_keep_only_what_it_reads():
    assert not ignored_settings(SSTokenConfig(selector="full", select_ratio=0.3, history="ema", gamma=0.1))
    switched = SSTokenConfig.recommended(selector="random")
    assert (
        switched.selector == "random"
        and switched.select_warmup_ratio == SSTokenConfig.recommended().select_warmup_ratio
    )
    assert not switched.protect_response_end  # the recommendation's protection: random does not read it
    with pytest.raises(ValueError, match="would ignore gamma=0.3"):
        SSTokenConfig.recommended(gamma=0.3)  # given by the user, not by the preset: refused
