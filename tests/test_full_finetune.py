"""Full fine-tuning without PEFT: history "model" (another checkpoint or a frozen copy) and "ema" of all weights."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.history.ema import EMAHistory
from sstoken_trl.tools.tiny import build_model
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.reference import token_log_probs


class WeightsAfterEachStep(TrainerCallback):
    """theta at train start and after every optimizer step (listed after SSTokenCallback)."""

    def __init__(self) -> None:
        self.thetas: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.thetas.append({n: p.detach().double().clone() for n, p in model.named_parameters()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.thetas.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def train(tokenizer, model, sstoken, *extra, **overrides) -> SFTTrainer:
    args = cpu_sft_args(
        **(
            {
                "output_dir": "/tmp/sstoken-test-full",
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "learning_rate": 2e-2,
                "logging_steps": 1,
            }
            | overrides
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        callbacks=[sstoken, *extra],
    )
    trainer.train()
    return trainer


def history_and_current(sstoken: SSTokenCallback, tokenizer):
    last = sstoken.last_selection
    inputs = {"input_ids": last.input_ids, "attention_mask": (last.input_ids != tokenizer.pad_token_id).long()}
    his = sstoken.history.log_probs(sstoken.selective_forward.forward, {**inputs, "labels": last.labels})
    with torch.no_grad():
        current = sstoken.selective_forward.forward(**inputs, labels=last.labels, fused_lm_head=True).log_probs
    return inputs, last, his, current


def test_history_model_is_another_checkpoint(tokenizer, tmp_path):
    build_model("llama", len(tokenizer), seed=7).save_pretrained(tmp_path / "other")
    sstoken = SSTokenCallback(SSTokenConfig(history="model", history_model=str(tmp_path / "other")))
    train(tokenizer, build_model("llama", len(tokenizer)), sstoken)
    inputs, last, his, current = history_and_current(sstoken, tokenizer)
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "other")  # loaded apart, full logits
    with torch.no_grad():
        expected = token_log_probs(other(**inputs).logits, last.input_ids)
    torch.testing.assert_close(his[last.response], expected[last.response], atol=1e-5, rtol=0)
    assert (current - his)[last.response].abs().max() > 1e-2


def test_history_model_as_a_frozen_copy_stays_at_the_start_weights(tokenizer):
    model = build_model("llama", len(tokenizer))
    sstoken = SSTokenCallback(SSTokenConfig(history="model"), history_model=copy.deepcopy(model))
    train(tokenizer, model, sstoken)
    inputs, last, his, current = history_and_current(sstoken, tokenizer)
    with torch.no_grad():  # the same seed rebuilds the weights training started from
        expected = token_log_probs(build_model("llama", len(tokenizer))(**inputs).logits, last.input_ids)
    torch.testing.assert_close(his[last.response], expected[last.response], atol=1e-5, rtol=0)
    assert (current - his)[last.response].abs().max() > 1e-2  # training moved the model, not the copy


def test_ema_of_all_weights_kept_on_cpu_follows_eq4(tokenizer):
    alpha = 0.6
    sstoken = SSTokenCallback(SSTokenConfig(history="ema", ema_alpha=alpha, ema_on_cpu=True))
    recorder = WeightsAfterEachStep()
    model = build_model("llama", len(tokenizer))
    train(tokenizer, model, sstoken, recorder)
    ema = sstoken.history
    assert isinstance(ema, EMAHistory) and ema.numel() == sum(p.numel() for p in model.parameters())
    assert all(t.device.type == "cpu" for t in ema.shadow.values())
    reference = recorder.thetas[0]  # Eq. 4 in float64, from theta_0 = the start weights
    for theta in recorder.thetas[1:]:
        reference = {n: alpha * reference[n] + (1 - alpha) * theta[n] for n in reference}
    for name, value in reference.items():
        torch.testing.assert_close(ema.shadow[name].double(), value, atol=1e-6, rtol=0, msg=name)
    # The history forward is the model carrying the EMA weights: compare with a separate model holding them.
    inputs, last, his, current = history_and_current(sstoken, tokenizer)
    holder = build_model("llama", len(tokenizer))
    holder.load_state_dict({n: t.float() for n, t in reference.items()})
    with torch.no_grad():
        expected = token_log_probs(holder(**inputs).logits, last.input_ids)
    torch.testing.assert_close(his[last.response], expected[last.response], atol=1e-5, rtol=0)
    assert (current - his)[last.response].abs().max() > 1e-3
