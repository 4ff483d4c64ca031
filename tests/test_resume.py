"""A run stopped at a checkpoint and resumed selects the same tokens and reaches the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from sstoken_trl import SSTokenCallback, SSTokenConfig
from tests.test_train import make_trainer


class KeptLog(TrainerCallback):
    """The kept positions of the last micro-batch of each optimizer step, by step."""

    def __init__(self, sstoken: SSTokenCallback) -> None:
        self.sstoken, self.kept = sstoken, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.kept[state.global_step] = self.sstoken.last_selection.keep.clone()


def run(tokenizer, output_dir, config, resume=None, max_steps=4):
    sstoken = SSTokenCallback(config)
    log = KeptLog(sstoken)
    trainer = make_trainer(
        tokenizer,
        callbacks=[sstoken, log],
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="constant",
    )
    trainer.train(resume_from_checkpoint=resume)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return weights, log.kept, trainer.state.log_history


@pytest.mark.parametrize(
    "config",
    [SSTokenConfig(rel_warmup_steps=3), SSTokenConfig(selector="random", seed=3)],
    ids=["sstoken-warmup", "random"],
)
def test_resume_equals_uninterrupted(tokenizer, tmp_path, config):
    weights, kept, logs = run(tokenizer, tmp_path / "straight", config)
    run(tokenizer, tmp_path / "stopped", config, max_steps=2)
    resumed_weights, resumed_kept, resumed_logs = run(
        tokenizer, tmp_path / "stopped", config, resume=str(tmp_path / "stopped" / "checkpoint-2")
    )
    assert sorted(resumed_kept) == [3, 4]
    for step in (3, 4):  # step 3 is still in the REL warm-up, step 4 is not
        assert torch.equal(resumed_kept[step], kept[step])
    for name, value in weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-5, rtol=0)
    losses = {log["step"]: log["loss"] for log in logs if "loss" in log}
    for log in resumed_logs:
        if "loss" in log:
            assert abs(log["loss"] - losses[log["step"]]) < 1e-5
            assert "sstoken/selected_fraction" in log
