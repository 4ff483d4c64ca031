"""history="base": the trained model with adapters disabled is exactly a separately loaded base model."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from sstoken_trl.history import BaseHistory, ModelHistory
from sstoken_trl.tools.tiny import build_model
from tests.reference import token_log_probs


def test_base_history_equals_a_separately_loaded_base_model(tmp_path):
    base = build_model("qwen2", 120, seed=3)
    base.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    add_fused_lm_head(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    input_ids = torch.randint(3, 120, (2, 10))
    labels = input_ids.clone()
    labels[:, :3] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    his = BaseHistory(peft_model).log_probs(peft_model.get_base_model().forward, inputs)
    separate = ModelHistory(loaded, like=peft_model.get_base_model()).log_probs(None, inputs)
    assert torch.equal(his, separate)
    with torch.no_grad():
        current = peft_model(**inputs, fused_lm_head=True).log_probs
    assert (current - his).abs().max() > 1e-3  # the adapters do change the model: history is not the current model
    assert not his.requires_grad


def test_base_history_runs_without_dropout():
    """A training-mode model with attention and LoRA dropout: the base log-probs are those of the dropout-free base."""
    base = build_model("llama", 120, seed=5, attention_dropout=0.5)
    add_fused_lm_head(base)
    lora = LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(base, lora).train()
    input_ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    history = BaseHistory(peft_model)
    forward = peft_model.get_base_model().forward
    first, second = history.log_probs(forward, inputs), history.log_probs(forward, inputs)
    assert torch.equal(first, second)
    assert peft_model.training and all(m.training for m in peft_model.modules())  # modes restored
    plain = build_model("llama", 120, seed=5, attention_dropout=0.0).eval()  # independent: same weights, full logits
    with torch.no_grad():
        expected = token_log_probs(plain(input_ids=input_ids).logits, input_ids)
    response = labels[:, 1:] != -100
    torch.testing.assert_close(first[response], expected[response], atol=1e-5, rtol=0)
