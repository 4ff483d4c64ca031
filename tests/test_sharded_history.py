"""History sources under FSDP and DeepSpeed ZeRO-3: each is prepared for the engine or refused, with the reason.

DeepSpeed is not installed here, so ZeRO-3 is registered the way transformers' TrainingArguments registers it:
a ZeRO-3 config object behind transformers' `is_deepspeed_zero3_enabled()` (accelerate's HfDeepSpeedConfig, the
class transformers' own subclasses). That is the predicate `from_pretrained` reads to partition a model with
`zero.Init` as it loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from datasets import Dataset
from peft import LoraConfig
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTConfig, SFTTrainer

from benchmarks.noisy_sft import LOSS_TRUNCATION_TWO_RUNS
from sstoken_trl import SSTokenCallback, SSTokenConfig
from sstoken_trl.history import HistoryContext, build_history
from sstoken_trl.integration.guards import check_runtime
from sstoken_trl.tools.tiny import build_model
from sstoken_trl.trl_internals import fused_model
from tests.conftest import cpu_sft_args, prompt_completion_rows


@contextmanager
def zero3() -> Iterator[None]:
    """A ZeRO-3 config registered in transformers, as TrainingArguments(deepspeed=...) registers it (after the
    trained model is built: from here on transformers would build every model under zero.Init)."""
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert is_deepspeed_zero3_enabled()
        yield
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


def trainer(tokenizer, config: SSTokenConfig, history_model=None, **overrides) -> SFTTrainer:
    return SFTTrainer(
        model=build_model("llama", len(tokenizer)),
        args=SFTConfig(**cpu_sft_args(**overrides)),
        train_dataset=Dataset.from_list(prompt_completion_rows(8)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        callbacks=[SSTokenCallback(config, history_model=history_model)],
    )


@pytest.fixture
def run1(tokenizer, tmp_path):
    """Run 1 of loss truncation, saved: the history model of the recommended configuration."""
    path = tmp_path / "run1"
    build_model("llama", len(tokenizer), seed=3).save_pretrained(path)
    return str(path)


def test_history_model_load_under_zero3_without_an_engine_is_refused(tokenizer, run1):
    # Before: from_pretrained ran under zero.Init (here: failed importing deepspeed; with deepspeed: a model with
    # empty weights, then called outside any engine). Now: refused before loading, saying what to do.
    config = SSTokenConfig(**LOSS_TRUNCATION_TWO_RUNS)
    model = build_model("llama", len(tokenizer))
    context = HistoryContext(config, model, model, model.forward, run1)  # sstoken-inspect: no trainer
    with zero3(), pytest.raises(ValueError, match=r"ZeRO-3 .*partitioned.*DeepSpeed engine") as refused:
        build_history(context)
    assert "outside training" in str(refused.value) and "accelerate launch" in str(refused.value)


def test_history_model_load_under_zero3_in_a_trainer_without_deepspeed_is_refused(tokenizer, run1):
    sft = trainer(tokenizer, SSTokenConfig(**LOSS_TRUNCATION_TWO_RUNS), history_model=run1)
    inner = fused_model(sft.model)
    context = HistoryContext(sft_config(sft), sft.model, inner, inner.forward, run1, sft)
    with zero3(), pytest.raises(ValueError, match="in a trainer that runs no DeepSpeed engine"):
        build_history(context)
    # Without ZeRO-3 the same history model loads, frozen, with TRL's fused LM head, next to the trained model.
    history = build_history(context)
    assert not any(p.requires_grad for p in history.model.parameters()) and not history.model.training


def sft_config(sft: SFTTrainer) -> SSTokenConfig:
    return next(cb for cb in sft.callback_handler.callbacks if isinstance(cb, SSTokenCallback)).config


@pytest.mark.parametrize("source", ["ema", "snapshot"])
def test_averaged_history_under_zero3_is_refused_with_its_memory(tokenizer, source):
    config = SSTokenConfig(history=source, select_warmup_ratio=0.5)
    sft = trainer(tokenizer, SSTokenConfig(history="base"))
    numel = sum(p.numel() for p in sft.model.parameters() if p.requires_grad)
    sft.is_deepspeed_enabled = True  # what Trainer sets under a DeepSpeed accelerate config
    with zero3(), pytest.raises(ValueError, match=rf"history={source!r} is not supported with DeepSpeed") as refused:
        check_runtime(sft, config)
    assert f"{numel:,} trainable values" in str(refused.value)
    assert f"{4 * numel / 2**20:,.1f} MiB" in str(refused.value) and "FSDP2" in str(refused.value)


@pytest.mark.parametrize("source", ["ema", "snapshot"])
def test_averaged_history_under_fsdp_trains_but_is_refused_when_checkpoints_are_saved(tokenizer, source):
    config = SSTokenConfig(history=source, select_warmup_ratio=0.5)
    sft = trainer(tokenizer, SSTokenConfig(history="base"), save_strategy="steps", save_steps=1)
    check_runtime(sft, config)  # one process: the EMA is whole and saved with every checkpoint
    sft.is_fsdp_enabled = True  # what Trainer sets under an FSDP accelerate config
    with pytest.raises(ValueError, match="save_strategy='no'"):
        check_runtime(sft, config)
    sft.args.save_strategy = "no"
    check_runtime(sft, config)  # sharded like the parameters (tests/test_fsdp.py)


def test_base_and_model_history_are_allowed_when_sharded(tokenizer, run1):
    sft = trainer(tokenizer, SSTokenConfig(history="base"))
    sft.is_deepspeed_enabled = True
    with zero3():
        for config in (SSTokenConfig(history="base"), SSTokenConfig(history="model", history_model=run1)):
            check_runtime(sft, config)  # base: adapters off inside the engine's forward; model: its own engine
        with pytest.raises(ValueError, match="history='cache' is not supported"):
            check_runtime(sft, SSTokenConfig(history="cache", history_cache_dir=run1))
