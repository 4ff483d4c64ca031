"""SSTokenConfig validation and the train-start checks."""

from __future__ import annotations

import pytest
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.tools.tiny import build_model
from tests.conftest import prompt_completion_rows


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"select_ratio": 0.0}, "select_ratio"),
        ({"select_ratio": 1.5}, "select_ratio"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": 1.01}, "gamma"),
        ({"scope": "global"}, "'sample', 'batch'"),
        ({"attn_backend": "flash"}, "'sdpa', 'eager'"),
        ({"history": "teacher"}, "'base'"),
        ({"selector": "tokencleaning"}, "'sstoken'"),
        ({"rel_warmup_steps": -1}, "rel_warmup_steps"),
    ],
)
def test_bad_values_are_rejected_with_the_allowed_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSTokenConfig(**kwargs)


def test_layer_index():
    config = SSTokenConfig(attn_layer=-1)
    assert config.layer_index(28) == 27
    assert SSTokenConfig(attn_layer=3).layer_index(28) == 3
    with pytest.raises(ValueError, match="out of range.*2 decoder layers"):
        SSTokenConfig(attn_layer=2).layer_index(2)
    with pytest.raises(ValueError, match="out of range"):
        SSTokenConfig(attn_layer=-3).layer_index(2)


def trainer_for(tokenizer, model, config):
    return SFTTrainer(
        model=model,
        args=SFTConfig(output_dir="/tmp/sstoken-test-out", max_steps=1, report_to=[], use_cpu=True),
        train_dataset=Dataset.from_list(prompt_completion_rows(4)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[SSTokenCallback(config)],
    )


def test_train_start_rejects_layer_out_of_range(tokenizer):
    trainer = trainer_for(tokenizer, build_model("llama", len(tokenizer)), SSTokenConfig(attn_layer=5))
    with pytest.raises(ValueError, match="attn_layer=5 is out of range"):
        trainer.train()
