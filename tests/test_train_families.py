"""One real SFTTrainer step with SSTokenCallback for every supported decoder family (LoRA, history = base)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from tests.conftest import cpu_sft_args, prompt_completion_rows
from tests.families import FAMILY_CONFIGS, build_family_model, gate_stops, scored_here

# The attention projections of every family: q/k/v/o, Phi-3's qkv_proj, GPT-NeoX's query_key_value, GPT-2's c_attn.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn"]


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_one_sft_step_with_sstoken(tokenizer, model_type):
    callback = SSTokenCallback(SSTokenConfig(select_ratio=0.5))
    trainer = SFTTrainer(
        model=build_family_model(model_type, len(tokenizer)),
        args=SFTConfig(**cpu_sft_args(max_steps=1, learning_rate=1e-3, gradient_checkpointing=True)),
        train_dataset=Dataset.from_list(prompt_completion_rows(4)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS),
        callbacks=[callback],
    )
    if not scored_here(model_type):
        with gate_stops():
            trainer.train()
        assert trainer.state.global_step == 0
        return
    result = trainer.train()
    selection = callback.last_selection
    response = selection.response
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert (selection.attn_score[response] > 0).any()
    kept = selection.keep.sum().item()
    assert 0 < kept < response.sum().item()  # a real selection, not plain SFT
