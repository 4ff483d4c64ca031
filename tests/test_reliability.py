"""Determinism, empty and broken micro-batches, and a long run that holds no memory across steps."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from trl.trainer.utils import add_fused_lm_head

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.history import ModelHistory
from sstoken_trl.integration.selective_forward import SelectiveForward
from sstoken_trl.scoring.hook import AttnScoreHook
from sstoken_trl.selection.budget import SelectionBudget
from sstoken_trl.tools.tiny import build_model
from tests.test_train import make_trainer


def test_same_seed_same_selections_and_losses(tokenizer):
    runs = []
    for _ in range(2):
        sstoken = SSTokenCallback(SSTokenConfig(select_ratio=0.5))
        trainer = make_trainer(tokenizer, callbacks=[sstoken], learning_rate=1e-2, max_steps=3)
        trainer.train()
        runs.append((trainer.state.log_history, sstoken.last_selection))
    (logs_a, sel_a), (logs_b, sel_b) = runs
    assert [log.get("loss") for log in logs_a] == [log.get("loss") for log in logs_b]
    assert torch.equal(sel_a.keep, sel_b.keep) and torch.equal(sel_a.score, sel_b.score)


def test_micro_batch_without_response_tokens_gives_zero_loss_not_nan():
    model = build_model("llama", 50)
    add_fused_lm_head(model)
    from peft import get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    inner = peft_model.get_base_model()
    hook = AttnScoreHook(inner.model.layers[-1].self_attn, "sdpa")
    from sstoken_trl.history import BaseHistory

    step = SelectiveForward(inner.forward, SSTokenConfig(), hook, BaseHistory(peft_model))
    input_ids = torch.randint(3, 50, (2, 6))
    batch = SelectionBudget(
        lambda _: {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.full((2, 6), -100),
        },
        0.6,
        "sample",
    )([])
    assert (batch["labels"] == -100).all()
    out = step(**batch, fused_lm_head=True)
    assert out.loss == 0 and not out.label_mask.any() and torch.isfinite(out.log_probs).all()
    out.loss.backward()  # still connected to the graph: a differentiable zero
    calls, stats = step.take_stats()
    assert calls == 1 and stats  # every statistic of an empty micro-batch is zero, none NaN
    assert all(float(num) == 0 and (den is None or float(den) == 0) for num, den in stats.values())


def test_non_finite_history_is_reported_and_never_selected(tokenizer, tmp_path):
    broken = build_model("llama", len(tokenizer), seed=9)
    with torch.no_grad():
        broken.lm_head.weight[5] = torch.nan  # every next-token distribution of the history is NaN
    broken.save_pretrained(tmp_path / "broken")
    history = AutoModelForCausalLM.from_pretrained(tmp_path / "broken")
    sstoken = SSTokenCallback(SSTokenConfig(history="model"), history_model=history)
    trainer = make_trainer(tokenizer, callbacks=[sstoken], max_steps=1)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == 0.0
    assert logs["sstoken/selected_fraction"] == 0.0
    assert logs["sstoken/nonfinite_rel_tokens"] > 0
    assert not sstoken.last_selection.keep.any()
    assert isinstance(sstoken.history, ModelHistory)


class TensorCount(TrainerCallback):
    def __init__(self, at: tuple[int, ...]) -> None:
        self.at, self.counts = at, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            gc.collect()
            self.counts[state.global_step] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_long_run_holds_no_tensors_across_steps_and_leaves_the_model_as_it_was(tokenizer):
    sstoken = SSTokenCallback()
    counter = TensorCount(at=(50, 500))
    trainer = make_trainer(
        tokenizer,
        callbacks=[sstoken, counter],
        max_steps=500,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        logging_steps=50,
        disable_tqdm=True,
    )
    trainer.train()
    assert counter.counts[500] <= counter.counts[50], counter.counts
    # After training the model computes exactly what an identical model that never had the callback computes.
    inner = trainer.model.get_base_model()
    fresh = build_model("llama", len(tokenizer))
    add_fused_lm_head(fresh)
    from peft import get_peft_model

    twin = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    twin.load_state_dict(trainer.model.state_dict())
    ids = torch.randint(3, len(tokenizer), (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainer.model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(**inputs).logits, twin(**inputs).logits)
        a = trainer.model(**inputs, fused_lm_head=True)
        b = twin(**inputs, fused_lm_head=True)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.label_mask, b.label_mask)
    assert not any(m._forward_pre_hooks for m in inner.modules())


def test_unavailable_attention_backend_fails_at_load_not_silently(tmp_path):
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: the backend is available")
    build_model("llama", 50).save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="FlashAttention2"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
