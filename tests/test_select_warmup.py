"""Selection warm-up (every token trained first) and history="snapshot" (the model when the warm-up ended)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.selection.budget import REAL_LABELS, WARMUP_ROWS, SelectionBudget
from sstoken_trl.selection.equations import kept_count
from sstoken_trl.trl_internals import collate_owner
from tests.test_history_ema import trainer_for


def labels_batch(examples: list) -> dict[str, torch.Tensor]:
    labels = torch.tensor([[-100, -100, 4, 5, 6, 7, 8], [-100, 3, 4, 5, -100, -100, -100]])
    return {"labels": labels, "attention_mask": (torch.arange(7) < torch.tensor([[7], [4]])).long()}


def counted(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["labels"][:, 1:] != -100).sum(1).tolist()


def test_budget_counts_every_token_during_the_warmup_then_ceil_rho_n():
    budget = SelectionBudget(labels_batch, 0.6, "sample", warmup_steps=2)
    for step, warm in ((0, True), (1, True), (2, False), (5, False)):
        budget.set_step(step)
        batch = budget([])
        assert batch[WARMUP_ROWS].tolist() == [warm, warm]
        responses = (batch[REAL_LABELS][:, 1:] != -100).sum(1)
        assert counted(batch) == (responses if warm else kept_count(responses, 0.6)).tolist()
    assert WARMUP_ROWS not in SelectionBudget(labels_batch, 0.6, "sample")([])


def test_data_loader_workers_see_the_step_the_trainer_sets():
    budget = SelectionBudget(labels_batch, 0.6, "sample", warmup_steps=1)
    loader = DataLoader(range(2), batch_size=1, collate_fn=budget, num_workers=1, persistent_workers=True)
    assert all(batch[WARMUP_ROWS].all() for batch in loader)
    budget.set_step(1)
    assert not any(batch[WARMUP_ROWS].any() for batch in loader)  # the same worker process, a new step


class CountCheck(TrainerCallback):
    """Records the labels the trainer counts for every collated batch; checks them against what was kept."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken, self.counted, self.fractions = sstoken, {}, []
        self.counts_all = sstoken.config.rel_keep_threshold is not None  # the loss is normalised by every token

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        owner = collate_owner(train_dataloader)
        collate = owner.collate_fn

        def recording(examples):
            batch = collate(examples)
            self.counted[batch["input_ids"].numpy().tobytes()] = int((batch["labels"] != -100).sum())
            return batch

        owner.collate_fn = recording

    def on_step_end(self, args, state, control, **kwargs):
        selection = self.sstoken.last_selection
        normaliser = selection.response if self.counts_all else selection.keep
        assert int(normaliser.sum()) == self.counted[selection.input_ids.numpy().tobytes()]
        self.fractions.append(float(selection.keep.sum() / selection.response.sum()))


@pytest.mark.parametrize(
    "config",
    [SSTokenConfig(select_warmup_ratio=0.5), SSTokenConfig.recommended_one_run()],
    ids=["sample", "recommended_one_run"],
)
def test_training_keeps_every_token_until_the_warmup_ends_and_counts_match(tokenizer, tmp_path, config):
    trainer, sstoken = trainer_for(tokenizer, config, tmp_path, max_steps=6)
    check = CountCheck(sstoken)
    trainer.add_callback(check)
    trainer.train()
    assert len(check.fractions) == 6
    assert check.fractions[:3] == [1.0, 1.0, 1.0]  # ceil(0.5 * 6) warm-up steps
    assert check.fractions[-1] < 1.0  # selecting: at least ceil(rho n) per sample or per micro-batch


class Weights(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step, self.weights = at_step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_snapshot_history_holds_the_weights_at_the_end_of_the_warmup(tokenizer, tmp_path):
    config = SSTokenConfig(select_warmup_ratio=0.5, history="snapshot", gamma=1.0)
    trainer, sstoken = trainer_for(tokenizer, config, tmp_path, max_steps=4)
    weights = Weights(at_step=2)
    trainer.add_callback(weights)
    trainer.train()
    snapshot = sstoken.history
    assert snapshot.updated_at == 2 and set(snapshot.shadow) == set(weights.weights)
    for name, value in weights.weights.items():
        assert torch.equal(snapshot.shadow[name], value.float()), name
    final = dict(trainer.model.named_parameters())
    assert max((final[n] - w).abs().max() for n, w in weights.weights.items()) > 1e-4  # training went on
    assert sstoken.last_selection.rel.abs().max() > 0  # REL against the snapshot, not the current model


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"history": "snapshot"}, "select_warmup_ratio > 0"),
        ({"select_warmup_ratio": 1.0}, "select_warmup_ratio=1.0"),
        ({"select_warmup_ratio": -0.1}, "select_warmup_ratio=-0.1"),
    ],
)
def test_bad_warmup_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SSTokenConfig(**settings)
