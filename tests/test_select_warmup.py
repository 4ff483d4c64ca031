"""Selection warm-up (every token trained first), its boundary at its optimizer step whatever the data loader
prefetches and across resumes, and history="snapshot" (the model when the warm-up ended)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from benchmarks.noisy_sft import RECOMMENDED_ONE_RUN
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.integration.warmup import WARMUP_FILE
from sstoken_trl.selection.budget import MARKED_STEP, REAL_LABELS, WARMUP_ROWS, SelectionBudget, take_warm_rows
from sstoken_trl.selection.equations import kept_count
from sstoken_trl.selection.selectors import budget_ratio
from tests.conftest import prompt_completion_rows
from tests.test_history_ema import trainer_for
from tests.test_train import make_trainer


def labels_batch(examples: list) -> dict[str, torch.Tensor]:
    labels = torch.tensor([[-100, -100, 4, 5, 6, 7, 8], [-100, 3, 4, 5, -100, -100, -100]])
    return {"labels": labels, "attention_mask": (torch.arange(7) < torch.tensor([[7], [4]])).long()}


def counted(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["labels"][:, 1:] != -100).sum(1).tolist()


def test_budget_counts_ceil_rho_n_when_collated_and_every_token_once_marked_as_a_warmup_step():
    budget = SelectionBudget(labels_batch, 0.6, "sample", warmup_steps=2)
    for step, warm in ((0, True), (1, True), (2, False), (5, False)):
        batch = budget([])  # collated ahead of its step: the selection's count
        responses = (batch[REAL_LABELS][:, 1:] != -100).sum(1)
        assert counted(batch) == kept_count(responses, 0.6).tolist()
        budget.mark_step([batch], step)  # when the trainer counts the step's micro-batches
        assert counted(batch) == (responses if warm else kept_count(responses, 0.6)).tolist()
        assert take_warm_rows(batch, step, 2).tolist() == [warm, warm]
        assert WARMUP_ROWS not in batch and MARKED_STEP not in batch  # the model never sees the marks
    batch = budget([])
    budget.mark_step([batch], 1)
    with pytest.raises(RuntimeError, match="counted for optimizer step 1 but trains in step 2"):
        take_warm_rows(batch, 2, 2)
    with pytest.raises(RuntimeError, match="counted for optimizer step None"):
        take_warm_rows(budget([]), 0, 2)
    assert take_warm_rows(budget([]), 0, 0) is None  # no warm-up: nothing to mark


ROWS = prompt_completion_rows(48)
# The hard form (drop_weight 0): after the warm-up selection drops tokens every step, and the kept count shows it.
RECOMMENDED = SSTokenConfig.recommended(surprise_nats=0.01, drop_weight=0.0)


class CountingTrainer(SFTTrainer):
    """SFTTrainer that records, per optimizer step (global_step when it begins), the token count it divides the
    loss by (`num_items_in_batch`) and the response and kept tokens of the step's micro-batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: dict[int, dict[str, int]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        sstoken = next(c for c in self.callback_handler.callbacks if isinstance(c, SSTokenCallback))
        selection = sstoken.last_selection  # of the micro-batch just computed
        step = self.steps.setdefault(self.state.global_step, {"counted": int(num_items_in_batch)})
        step["kept"] = step.get("kept", 0) + int(selection.keep.sum())
        step["response"] = step.get("response", 0) + int(selection.response.sum())
        step["attention"] = step.get("attention", 0.0) + float(selection.attn_score.abs().sum())
        return result

    def fractions(self) -> dict[int, float]:
        """Kept share of the response tokens, per optimizer step."""
        return {s: round(v["kept"] / v["response"], 6) for s, v in sorted(self.steps.items())}

    def check_counts(self, config: SSTokenConfig) -> None:
        """The trainer's count is the kept count every step (every response token for selectors whose kept number
        is known only after the forward: thresholds, self_truncation)."""
        normaliser = "response" if budget_ratio(config) == 1.0 else "kept"
        assert {s: v["counted"] for s, v in self.steps.items()} == {s: v[normaliser] for s, v in self.steps.items()}


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(tokenizer, output_dir, config=RECOMMENDED, resume=None, stop_at=None, **args):
    """Up to 6 optimizer steps over 48 rows (batches of 4), a checkpoint every 3 steps; `args` win.
    Returns the trainer, the ssToken callback and the trained weights."""
    sstoken = SSTokenCallback(config)
    trainer = make_trainer(
        tokenizer,
        rows=ROWS,
        callbacks=[sstoken] + ([StopAt(stop_at)] if stop_at else []),
        trainer_cls=CountingTrainer,
        **{
            "output_dir": str(output_dir),
            "max_steps": 6,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",
            "save_strategy": "steps",
            "save_steps": 3,
        }
        | args,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, sstoken, weights


@pytest.mark.parametrize(
    "config",
    [SSTokenConfig(select_warmup_ratio=0.5), SSTokenConfig(**RECOMMENDED_ONE_RUN)],
    ids=["sample", "recommended_one_run"],
)
def test_training_keeps_every_token_until_the_warmup_ends_and_counts_match(tokenizer, tmp_path, config):
    trainer, _, _ = train(tokenizer, tmp_path, config, save_strategy="no")
    fractions = trainer.fractions()
    assert list(fractions) == list(range(6))
    assert [fractions[s] for s in range(3)] == [1.0, 1.0, 1.0]  # ceil(0.5 * 6) warm-up steps
    assert fractions[3] < 1.0  # selecting from the first step after the warm-up
    trainer.check_counts(config)


RANDOM = SSTokenConfig(selector="random", select_warmup_ratio=0.5, seed=3)  # counts ceil(rho n): the count changes


@pytest.mark.parametrize(
    ("config", "workers", "accumulation"),
    [(RECOMMENDED, 0, 1), (RECOMMENDED, 0, 2), (RECOMMENDED, 1, 1), (RECOMMENDED, 1, 2), (RANDOM, 1, 2)],
    ids=["workers0-ga1", "workers0-ga2", "workers1-ga1", "workers1-ga2", "random-workers1-ga2"],
)
def test_the_warmup_ends_at_its_step_and_a_resume_at_the_boundary_trains_the_same(
    tokenizer, tmp_path, config, workers, accumulation
):
    settings = {"dataloader_num_workers": workers, "gradient_accumulation_steps": accumulation}
    straight, _, weights = train(tokenizer, tmp_path / "straight", config, **settings)
    fractions = straight.fractions()
    assert [fractions[s] for s in range(3)] == [1.0, 1.0, 1.0]  # ceil(0.5 * 6) warm-up steps
    assert all(fractions[s] < 1.0 for s in range(3, 6))  # selecting from the first step after the warm-up
    straight.check_counts(config)

    checkpoint = tmp_path / "straight" / "checkpoint-3"
    resumed, _, resumed_weights = train(tokenizer, tmp_path / "resumed", config, resume=checkpoint, **settings)
    assert resumed.fractions() == {s: fractions[s] for s in range(3, 6)}
    resumed.check_counts(config)
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "not-recorded"])
def test_a_resume_with_a_larger_max_steps_keeps_the_warmup_the_run_started_with(tokenizer, tmp_path, caplog, recorded):
    train(tokenizer, tmp_path / "first", stop_at=3, gradient_accumulation_steps=1)  # max_steps 6: warm-up 3
    checkpoint = tmp_path / "first" / "checkpoint-3"
    if not recorded:  # a checkpoint of a run without ssToken, or of an older version of it
        (checkpoint / WARMUP_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="sstoken_trl"):
        resumed, sstoken, _ = train(
            tokenizer, tmp_path / "resumed", resume=checkpoint, max_steps=10, stop_at=5, gradient_accumulation_steps=1
        )
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("sstoken_trl")]
    fractions = resumed.fractions()
    assert list(fractions) == [3, 4]
    resumed.check_counts(RECOMMENDED)
    if recorded:  # ceil(0.5 * 6) = 3 steps, as the run started; not ceil(0.5 * 10) = 5
        assert sstoken.selective_forward.select_warmup == 3
        assert fractions[3] < 1.0 and fractions[4] < 1.0
        assert any("max_steps=6" in w and "max_steps=10" in w for w in warnings), warnings
    else:  # nothing recorded: this run's max_steps, and a warning that says so
        assert sstoken.selective_forward.select_warmup == 5
        assert fractions == {3: 1.0, 4: 1.0}
        assert any(WARMUP_FILE in w for w in warnings), warnings


def test_the_rel_warmup_ends_at_its_step_with_workers_and_accumulation(tokenizer, tmp_path):
    config = SSTokenConfig(gamma=1.0, rel_warmup_ratio=0.5)  # gamma 0 (attention alone) in steps 0 and 1 of 4
    trainer, _, _ = train(tokenizer, tmp_path, config, max_steps=4, save_strategy="no", dataloader_num_workers=1)
    attention = {s: v["attention"] > 0 for s, v in trainer.steps.items()}
    assert attention == {0: True, 1: True, 2: False, 3: False}  # gamma 1 after: REL alone, no attention read
    trainer.check_counts(config)


class OwnCounting(SFTTrainer):
    """A trainer that counts a step's labels its own way, as a future transformers might."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = [next(epoch_iterator) for _ in range(num_batches)]
        return batches, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_a_trainer_that_counts_elsewhere_is_refused_before_it_trains(tokenizer, tmp_path):
    sstoken = SSTokenCallback(RECOMMENDED)
    trainer = make_trainer(tokenizer, callbacks=[sstoken], trainer_cls=OwnCounting, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="counts them elsewhere"):
        trainer.train()
    assert trainer.state.global_step == 0 and sstoken.selective_forward is None  # refused before changing anything


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
