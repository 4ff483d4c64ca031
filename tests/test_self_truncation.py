"""Loss truncation inside one run (selector='self_truncation'): drop what the model being trained finds far more
surprising than its own uncertainty, L_cur - H_cur > c. The selector against a plain loop, and a real SFTTrainer
run whose trained tokens are those an independent full-logit recomputation of the surprise keeps."""

from __future__ import annotations

import pytest
import torch

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.selectors import SELECTORS, Signals, budget_ratio
from tests.test_loss_truncation import plain_loop
from tests.test_train import Probe, make_trainer


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize(("rho", "protect", "c"), [(0.8, True, 3.0), (0.5, False, 1.0)])
def test_selector_keeps_what_a_plain_loop_keeps(scope, rho, protect, c):
    g = torch.Generator().manual_seed(11)
    labels = torch.full((3, 14), -100)
    labels[0, 3:14] = 5
    labels[1, 2:6] = 5
    labels[1, 8:12] = 5
    labels[2, 5:9] = 5
    config = SSTokenConfig(
        selector="self_truncation", scope=scope, select_ratio=rho, protect_response_end=protect, surprise_nats=c
    )
    entropy = torch.rand(3, 13, generator=g) * 3
    logp_cur = -(entropy + c + torch.randn(3, 13, generator=g) * 2)  # about half more surprising than c nats
    layout = batch_layout(labels)
    zeros = torch.zeros_like(logp_cur)
    signals = Signals(layout, zeros, zeros, 1.0, seed=3, logp_cur=logp_cur, vocab_size=0, entropy=entropy)
    score, keep, keep_rel = SELECTORS["self_truncation"].select(config, signals)
    surprise = -logp_cur - entropy
    assert torch.equal(keep, plain_loop(labels, surprise, config, threshold=c)) and torch.equal(keep_rel, keep)
    assert 0 < keep[layout.response].sum() < layout.response.sum()  # some tokens were truncated, not all
    assert torch.allclose(score[layout.response], surprise[layout.response])
    assert budget_ratio(config) == 1.0
    selector = SELECTORS["self_truncation"]
    assert not selector.needs_history(config, 1.0) and not selector.needs_attention(config, 0.0)


def test_bad_threshold_is_refused():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="surprise_nats"):
            SSTokenConfig(selector="self_truncation", surprise_nats=bad)


def test_sftrainer_trains_exactly_the_tokens_the_recomputed_surprise_keeps(tokenizer):
    config = SSTokenConfig(selector="self_truncation", surprise_nats=0.01, select_ratio=0.5, scope="batch")
    sstoken = SSTokenCallback(config)
    probe = Probe(sstoken)
    trainer = make_trainer(tokenizer, callbacks=[sstoken, probe], max_steps=1)
    trainer.train()
    dropped = responses = 0
    model = trainer.model.eval()
    for batch in probe.batches:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)
        surprise = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) - entropy
        response = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
        expected = plain_loop(batch["labels"], surprise, config, threshold=config.surprise_nats)
        assert torch.equal(batch["grad"] != 0, expected & response)
        dropped, responses = dropped + int((response & ~expected).sum()), responses + int(response.sum())
    # A random model's loss is close to its entropy; at 0.01 nats some tokens are suspects, and rho bounds them.
    assert 0 < dropped <= responses * 0.5
