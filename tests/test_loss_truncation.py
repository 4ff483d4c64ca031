"""Loss truncation against a self-reference: the selector against a plain loop, its refusals, and sstoken-train
with run 1 (plain SFT) trained first and given as the history model."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.noisy_sft import LOSS_TRUNCATION_TWO_RUNS
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.scoring.layout import batch_layout
from sstoken_trl.selection.selectors import SELECTORS, Signals, budget_ratio
from sstoken_trl.tools.arguments import parse_recipe
from sstoken_trl.tools.cli import train
from tests.conftest import tiny_cli_run

VOCAB = 50


def plain_loop(labels, ref_loss, config, threshold: float | None = None) -> torch.Tensor:
    """Per segment (a sample, or the batch): suspects are L_ref > threshold (c log V by default) but a response's
    last token (when protected); the lowest-L_ref suspects fill the kept set up to ceil(rho n), the others are
    dropped."""
    keep = torch.zeros_like(ref_loss, dtype=torch.bool)
    threshold = config.truncation_loss * math.log(VOCAB) if threshold is None else threshold
    rows = [[b] for b in range(labels.size(0))] if config.scope == "sample" else [list(range(labels.size(0)))]
    for segment in rows:
        safe, suspects = [], []
        for b in segment:
            positions = [t for t in range(labels.size(1) - 1) if labels[b, t + 1] != -100]
            for t in positions:
                end = t == positions[-1] or labels[b, t + 2] == -100 if t + 2 < labels.size(1) else True
                if ref_loss[b, t] > threshold and not (config.protect_response_end and end):
                    suspects.append((ref_loss[b, t].item(), b, t))
                else:
                    safe.append((b, t))
        room = max(0, math.ceil(config.select_ratio * (len(safe) + len(suspects)) - 1e-9) - len(safe))
        for b, t in safe + [(b, t) for _, b, t in sorted(suspects)[:room]]:
            keep[b, t] = True
    return keep


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize(("rho", "protect", "c"), [(0.8, True, 1.0), (0.5, False, 1.0), (0.9, True, 0.97)])
def test_selector_keeps_what_a_plain_loop_keeps(scope, rho, protect, c):
    g = torch.Generator().manual_seed(7)
    labels = torch.full((3, 14), -100)
    labels[0, 3:14] = 5
    labels[1, 2:6] = 5  # two response spans (a multi-turn sample)
    labels[1, 8:12] = 5
    labels[2, 5:9] = 5
    config = SSTokenConfig(
        selector="loss_truncation",
        history="model",
        scope=scope,
        select_ratio=rho,
        protect_response_end=protect,
        truncation_loss=c,
    )
    ref_loss = math.log(VOCAB) + torch.randn(3, 13, generator=g)  # about half above a uniform guess
    logp_cur = -torch.rand(3, 13, generator=g) * 5
    rel = logp_cur + ref_loss  # log p_cur - log p_ref
    layout = batch_layout(labels)
    signals = Signals(layout, rel, torch.zeros_like(rel), 1.0, seed=3, logp_cur=logp_cur, vocab_size=VOCAB)
    score, keep, keep_rel = SELECTORS["loss_truncation"].select(config, signals)
    expected = plain_loop(labels, ref_loss, config)
    assert torch.equal(keep, expected) and torch.equal(keep_rel, keep)
    assert not keep.all() and keep.sum() < layout.response.sum()  # some tokens were truncated
    assert torch.allclose(score[layout.response], ref_loss[layout.response], atol=1e-5)  # the score is L_ref
    assert budget_ratio(config) == 1.0  # kept number known after the forward: every response token counted


def test_bad_settings_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="set history='model' and history_model"):
        SSTokenConfig(selector="loss_truncation")
    with pytest.raises(ValueError, match="truncation_loss"):
        SSTokenConfig(selector="loss_truncation", history="model", truncation_loss=0.0)
    with pytest.raises(ValueError, match="plain-SFT run on the same data"):
        SSTokenCallback(SSTokenConfig(**LOSS_TRUNCATION_TWO_RUNS))


def test_sstoken_train_refuses_it_without_run_1_and_says_how(tmp_path):
    path, _, _ = tiny_cli_run(tmp_path, {"base": 1}, sstoken_selector="loss_truncation", sstoken_history="model")
    with pytest.raises(ValueError, match="Train it first") as refused:
        train(parse_recipe(["--config", str(path)]))
    assert "--sstoken_selector full" in str(refused.value) and "--sstoken_history_model RUN_1" in str(refused.value)


def test_sstoken_train_truncates_by_a_run_1_trained_first(tmp_path):
    two_runs = dict(sstoken_selector="loss_truncation", sstoken_history="model", sstoken_select_ratio=0.8)
    path, _, tokenizer = tiny_cli_run(tmp_path, {"base": 1}, **two_runs, sstoken_scope="batch")
    run_1 = tmp_path / "run1"
    train(parse_recipe(["--config", str(path), "--sstoken_selector", "full", "--output_dir", str(run_1)]))
    trainer = train(parse_recipe(["--config", str(path), "--sstoken_history_model", str(run_1)]))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSTokenCallback))
    assert callback.config.selector == "loss_truncation" and callback.config.history_model == str(run_1)
    selection = callback.last_selection
    dropped = selection.response & ~selection.keep
    assert (selection.score[dropped] > math.log(len(tokenizer))).all()  # only what run 1 rates below a uniform guess
    assert selection.keep.sum() / selection.response.sum() >= 0.8 and trainer.state.global_step == 2
